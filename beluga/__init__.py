"""Beluga's contracts: the settings, the registry record, the pool lookup protocol, shared
secrets and pool error handling. The bottom layer: it imports `kvpool` and nothing else of
Beluga's (the CLI is `beluga_cli`, above everything)."""
