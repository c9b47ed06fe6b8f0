{{/* Names and labels shared by every object of the release. */}}

{{- define "beluga.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-beluga, or the release name alone when it already contains the chart's name. */}}
{{- define "beluga.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the pods of one component (stable across upgrades). */}}
{{- define "beluga.selectorLabels" -}}
app.kubernetes.io/name: {{ include "beluga.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "beluga.labels" -}}
{{ include "beluga.selectorLabels" . }}
app.kubernetes.io/part-of: beluga
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The Secret with the worker credential, the server secret, API keys (and HF token). */}}
{{- define "beluga.secretName" -}}
{{- default (include "beluga.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The chart's own Secret with Redis' password, its URL and redis.conf. */}}
{{- define "beluga.redisSecretName" -}}
{{- printf "%s-redis" (include "beluga.fullname" .) -}}
{{- end -}}

{{/* A secret value: the one given, else the one already in the cluster (upgrades keep it),
     else a new random one. Args: root, secret (name), key, value. Returns plain text. */}}
{{- define "beluga.secretValue" -}}
{{- if .value -}}
{{- .value -}}
{{- else -}}
{{- $old := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- $data := dig "data" (dict) ($old | default (dict)) -}}
{{- if hasKey $data .key -}}
{{- index $data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 43 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Where the model folder is inside gateway and worker pods, or the Hub id. */}}
{{- define "beluga.modelRef" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "default" -}}
/var/lib/beluga/models/SmolLM2-135M-Instruct
{{- else if eq $m.source "hub" -}}
{{- required "model.hubId (org/name) is required with model.source=hub" $m.hubId -}}
{{- else if eq $m.source "volume" -}}
{{- $_ := required "model.volume.claimName is required with model.source=volume" $m.volume.claimName -}}
/model
{{- else -}}
{{- fail (printf "model.source must be default, hub or volume, not %q" $m.source) -}}
{{- end -}}
{{- end -}}

{{/* Environment of every Beluga container: model, Redis, credentials (gateway and workers). */}}
{{- define "beluga.commonEnv" -}}
- name: BELUGA_STATE_DIR
  value: /var/lib/beluga
- name: BELUGA_SERVED_MODEL_NAME
  value: {{ .Values.model.servedName | quote }}
- name: BELUGA_MODEL
  value: {{ include "beluga.modelRef" . | quote }}
- name: HF_HOME
  value: /var/lib/beluga/hf
- name: HF_HUB_OFFLINE
  value: {{ ternary "0" "1" (eq .Values.model.source "hub") | quote }}
{{- if and (eq .Values.model.source "hub") (or .Values.secrets.hfToken .Values.secrets.existingSecret) }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "beluga.secretName" . }}
      key: hf-token
      optional: true
{{- end }}
- name: BELUGA_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "beluga.redisSecretName" . }}
      key: url
- name: BELUGA_WORKER_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "beluga.secretName" . }}
      key: worker-api-key
{{- end -}}

{{/* Extra environment from a values map, sorted, as strings. */}}
{{- define "beluga.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* The init container that prepares the default model into the pod's state volume. */}}
{{- define "beluga.prepareModel" -}}
- name: prepare-model
  image: {{ .image }}
  imagePullPolicy: {{ .root.Values.imagePullPolicy }}
  args: ["model", "prepare"]
  env:
    - name: BELUGA_STATE_DIR
      value: /var/lib/beluga
  volumeMounts:
    - name: state
      mountPath: /var/lib/beluga
  resources:
    # dequantizing SmolLM2-135M into float32 safetensors
    requests: {cpu: "1", memory: 2Gi}
    limits: {memory: 4Gi}
  securityContext:
    allowPrivilegeEscalation: false
{{- end -}}

{{/* Volumes and mounts for the model (state is the emptyDir every Beluga pod has). */}}
{{- define "beluga.modelVolumes" -}}
- name: state
  emptyDir: {}
{{- if eq .Values.model.source "volume" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.volume.claimName }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "beluga.modelMounts" -}}
- name: state
  mountPath: /var/lib/beluga
{{- if eq .Values.model.source "volume" }}
- name: model
  mountPath: /model
  readOnly: true
  {{- with .Values.model.volume.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}
