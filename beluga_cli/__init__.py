"""The `beluga` command and `beluga up`, its supervisor: the top layer.

Nothing imports this package; it imports the others (`beluga`'s contracts, `gateway`,
`engine`), each only inside the subcommand that runs it, so a gateway-only install (no
`engine/`, no vLLM) runs `beluga gateway`.
"""
