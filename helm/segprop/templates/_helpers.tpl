{{/*
Names and shared snippets. Every resource name comes from here.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "segprop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource-name prefix: fullnameOverride, else the release name (plus the chart name when the
release name does not already contain it).
*/}}
{{- define "segprop.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The RayJob name, <fullname>-<runId>. Not truncated (a cut-off run id would make two runs collide):
it fails instead when KubeRay would reject it (a DNS-1035 label of at most 47 characters, since
KubeRay appends a 6-character suffix to name the RayCluster).
*/}}
{{- define "segprop.rayJobName" -}}
{{- $name := printf "%s-%s" (include "segprop.fullname" .) (toString .Values.runId) }}
{{- if gt (len $name) 47 }}
{{- fail (printf "RayJob name %q is %d characters; KubeRay allows 47. Use a shorter release name, fullnameOverride or runId." $name (len $name)) }}
{{- end }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "RayJob name %q is not a DNS-1035 label (lower-case letters, digits and '-', starting with a letter)." $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/* The ConfigMap holding the run config of this RayJob. */}}
{{- define "segprop.configMapName" -}}
{{- printf "%s-config" (include "segprop.rayJobName" .) }}
{{- end }}

{{/* Where the run config is mounted in the head pod, and the file the job runs. */}}
{{- define "segprop.configDir" -}}
/etc/segprop
{{- end }}

{{- define "segprop.configPath" -}}
{{- printf "%s/config.yaml" (include "segprop.configDir" .) }}
{{- end }}

{{/* The ServiceAccount of the Ray pods (empty: the namespace default). */}}
{{- define "segprop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "segprop.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "segprop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's objects. */}}
{{- define "segprop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "segprop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels of every object. */}}
{{- define "segprop.labels" -}}
helm.sh/chart: {{ include "segprop.chart" . }}
{{ include "segprop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: segprop
segprop/run-id: {{ .Values.runId | quote }}
{{- end }}

{{- define "segprop.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) }}
{{- end }}

{{/*
The job's entrypoint: `segprop run` on the mounted config, plus the `--set` overrides (their
characters are restricted by values.schema.json, so no quoting is needed).
*/}}
{{- define "segprop.entrypoint" -}}
{{- $args := list "segprop" "run" (include "segprop.configPath" .) }}
{{- range .Values.job.setOverrides }}
{{- $args = append $args "--set" }}
{{- $args = append $args . }}
{{- end }}
{{- join " " $args }}
{{- end }}

{{/* Environment of every Ray container (no secret values: those come from envFrom or valueFrom). */}}
{{- define "segprop.env" -}}
- name: RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
  value: {{ .Values.gracefulShutdown.drainTimeoutSeconds | quote }}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.huggingface.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.huggingface.tokenSecretKey | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Where the node-local cache volume is mounted in worker pods. */}}
{{- define "segprop.cacheDir" -}}
/cache
{{- end }}

{{/* "true" when a worker group has a cache volume (cacheGiB or cacheVolume), else empty. */}}
{{- define "segprop.hasCache" -}}
{{- if or .cacheVolume (not (kindIs "invalid" .cacheGiB)) }}true{{ end }}
{{- end }}

{{/*
The cache volume's source: the group's cacheVolume, else an emptyDir limited to cacheGiB.
Argument: the worker group's values.
*/}}
{{- define "segprop.cacheVolume" -}}
{{- if .cacheVolume }}
{{- toYaml .cacheVolume }}
{{- else }}
emptyDir:
  sizeLimit: {{ printf "%dGi" (int .cacheGiB) | quote }}
{{- end }}
{{- end }}

{{/*
Environment of a worker group's cache: segprop's node cache (SEGPROP_CACHE, kept under 90% of the
volume by SEGPROP_CACHE_MAX_GB) and Hugging Face's (HF_HOME) on the cache volume.
Argument: the worker group's values.
*/}}
{{- define "segprop.cacheEnv" -}}
{{- if (include "segprop.hasCache" .) }}
- name: SEGPROP_CACHE
  value: "/cache/segprop"
- name: HF_HOME
  value: "/cache/huggingface"
{{- if not (kindIs "invalid" .cacheGiB) }}
- name: SEGPROP_CACHE_MAX_GB
  value: {{ div (mul (int .cacheGiB) 9) 10 | toString | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Annotations of the head pod: the do-not-disrupt pair when asked for, then the user's. */}}
{{- define "segprop.headAnnotations" -}}
{{- $annotations := dict }}
{{- if .Values.head.doNotDisrupt }}
{{- $_ := set $annotations "karpenter.sh/do-not-disrupt" "true" }}
{{- $_ := set $annotations "cluster-autoscaler.kubernetes.io/safe-to-evict" "false" }}
{{- end }}
{{- $annotations = merge (deepCopy (.Values.head.podAnnotations | default dict)) $annotations }}
{{- if $annotations }}
{{- toYaml $annotations }}
{{- end }}
{{- end }}

{{/*
Container resources with the GPUs of a group added to requests and limits, and its ephemeral storage
to the requests (a request only: going past a limit would evict the pod).
Arguments: dict "resources" <requests/limits> "gpus" <int> "gpuName" <resource name>
"ephemeralStorage" <quantity or empty>.
*/}}
{{- define "segprop.containerResources" -}}
{{- $res := deepCopy .resources }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $res.requests .gpuName (toString .gpus) }}
{{- $_ := set $res.limits .gpuName (toString .gpus) }}
{{- end }}
{{- with .ephemeralStorage }}
{{- $_ := set $res.requests "ephemeral-storage" (toString .) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
Seconds the preStop hook of a worker may wait for its tasks and actors to leave: the grace period
less the drain timeout `ray start` still needs after SIGTERM, less a margin.
Arguments: dict "group" <worker group values> "root" <top-level context>.
*/}}
{{- define "segprop.preStopBudget" -}}
{{- sub (sub (int .group.terminationGracePeriodSeconds) (int .root.Values.gracefulShutdown.drainTimeoutSeconds)) 10 }}
{{- end }}

{{/*
preStop hook of a worker: mark this Ray node as preempted, so Ray Train takes a checkpoint and moves
its workers, then wait (bounded by the budget). Once a training worker has seen the notice (a
`<pid>-<step>.notice` marker in SEGPROP_PREEMPT_DIR), wait until every notice has its `.saved` marker
(the checkpoint of that step is uploaded) or its worker process is gone; before any notice, wait while
a task or actor process is left on the node (idle workers, `ray::IDLE`, do not count). Only the notices
of live processes count: markers an earlier notice left (every rank sees every notice) say nothing of
the workers training now.
SEGPROP_PROC_ROOT (default /proc) exists for the chart's tests.
Argument: the wait budget in seconds.
*/}}

{{/* Where training workers leave their preemption markers (the container's own /tmp: the hook runs there). */}}
{{- define "segprop.preemptDir" -}}
/tmp/segprop-preempt
{{- end }}
{{- define "segprop.preStopDrain" -}}
lifecycle:
  preStop:
    exec:
      command:
        - /bin/bash
        - -c
        - |
          budget={{ . }}
          timeout 20 ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION \
            --reason-message "pod terminating" --deadline-remaining-seconds "$budget" || true
          proc="${SEGPROP_PROC_ROOT:-/proc}"
          marks="${SEGPROP_PREEMPT_DIR:-}"
          busy() {
            for f in "$proc"/[0-9]*/cmdline; do
              cmd=$(tr '\0' ' ' < "$f" 2>/dev/null) || continue
              case "$cmd" in "ray::IDLE"*) ;; "ray::"*) return 0 ;; esac
            done
            return 1
          }
          live() { [ -e "$1" ] && [ -d "$proc/$(head -n1 "$1")" ]; }
          noticed() {
            for n in "$marks"/*.notice; do live "$n" && return 0; done
            return 1
          }
          unsaved() {
            for n in "$marks"/*.notice; do
              live "$n" && [ ! -e "${n%.notice}.saved" ] && return 0
            done
            return 1
          }
          while [ "$SECONDS" -lt "$budget" ]; do
            if noticed; then unsaved || break; else busy || break; fi
            sleep 1
          done
{{- end }}
