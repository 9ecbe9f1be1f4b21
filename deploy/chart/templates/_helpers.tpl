{{/* Names: a RayJob name must stay short (KubeRay appends a suffix for its RayCluster). */}}
{{- define "dispo-ray.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dispo-ray.labels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "dispo-ray.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "dispo-ray.runDir" -}}
{{- default (printf "%s/runs/%s" .Values.storage.mountPath (include "dispo-ray.fullname" .)) .Values.trainer.runDir -}}
{{- end -}}

{{/* The Secret holding the Ray auth token (key auth_token, as KubeRay expects). */}}
{{- define "dispo-ray.authSecretName" -}}
{{- default (printf "%s-ray-token" (include "dispo-ray.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* Labels selecting every pod of this release (the NetworkPolicy's peers). */}}
{{- define "dispo-ray.selectorLabels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The custom Ray resource a worker group advertises and its pool asks for (call with the group name). */}}
{{- define "dispo-ray.nodeResource" -}}
dispo_{{ . }}
{{- end -}}

{{/* The Hydra overrides of the entrypoint, one per line (each line is one argument). */}}
{{- define "dispo-ray.overrides" -}}
{{- $v := .Values -}}
{{- $genGpus := mul (int $v.generator.replicas) (int $v.generator.gpusPerPod) -}}
{{- $tp := int $v.generator.tensorParallelSize -}}
{{- if or (eq $genGpus 0) (ne (mod $genGpus $tp) 0) -}}
{{- fail (printf "generator: replicas * gpusPerPod (%d) must be a positive multiple of tensorParallelSize (%d)" $genGpus $tp) -}}
{{- end -}}
{{- $learners := mul (int $v.learner.replicas) (int $v.learner.gpusPerPod) -}}
{{- if eq $learners 0 -}}
{{- fail "learner: replicas * gpusPerPod must be at least 1" -}}
{{- end }}
+preset=gpu
cluster.address=auto
algorithm={{ $v.dispo.algorithm }}
algorithm.eps_low_pos={{ $v.dispo.epsLowPos }}
algorithm.eps_high_pos={{ $v.dispo.epsHighPos }}
algorithm.eps_low_neg={{ $v.dispo.epsLowNeg }}
algorithm.eps_high_neg={{ $v.dispo.epsHighNeg }}
{{- with $v.model.path }}
model.path={{ . | quote }}
{{- end }}
model.dtype={{ $v.model.dtype }}
{{- with $v.data.trainFiles }}
data.train_files={{ toJson . }}
{{- end }}
{{- with $v.data.valFiles }}
data.val_files={{ toJson . }}
{{- end }}
generator.num_actors={{ div $genGpus $tp }}
generator.tensor_parallel_size={{ $tp }}
generator.num_gpus_per_actor={{ $tp }}
learner.num_actors={{ $learners }}
learner.num_gpus_per_actor=1
learner.zero_stage={{ $v.learner.zeroStage }}
reward.num_workers={{ $v.reward.numWorkers }}
{{- range list "generator" "learner" "reward" }}
{{ . }}.node_resource={{ include "dispo-ray.nodeResource" . }}
{{- end }}
trainer.total_steps={{ $v.trainer.totalSteps }}
trainer.max_staleness={{ $v.trainer.maxStaleness }}
trainer.run_dir={{ include "dispo-ray.runDir" . | quote }}
trainer.progress_bar=false
{{- with $v.trainer.wandbProject }}
trainer.wandb_project={{ . | quote }}
{{- end }}
{{- range $v.extraOverrides }}
{{ . }}
{{- end }}
{{- end -}}

{{/* The job's shell command line (KubeRay runs it through a shell): every argument single-quoted. */}}
{{- define "dispo-ray.entrypoint" -}}
{{- $args := list -}}
{{- range splitList "\n" (include "dispo-ray.overrides" . | trim) -}}
{{- $args = append $args (squote .) -}}
{{- end -}}
python -m dispo_ray.main {{ join " " $args }}
{{- end -}}

{{- define "dispo-ray.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsGroup }}
fsGroup: {{ .Values.security.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Call with dict "root" $ "extraCaps" (list ...): capabilities a group needs on top of security.addCapabilities. */}}
{{- define "dispo-ray.containerSecurityContext" -}}
privileged: false
allowPrivilegeEscalation: false
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
  {{- with (concat .root.Values.security.addCapabilities (default list .extraCaps) | uniq) }}
  add: {{ toJson . }}
  {{- end }}
{{- end -}}

{{/* Ray token authentication (also what KubeRay injects; set here so the submitter and every Ray
     container carry it whatever the operator version does). */}}
{{- define "dispo-ray.authEnv" -}}
- {name: RAY_AUTH_MODE, value: token}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "dispo-ray.authSecretName" . | quote }}, key: auth_token}
{{- end -}}

{{/* NCCL settings of the GPU pods (nccl.* in values.yaml). */}}
{{- define "dispo-ray.ncclEnv" -}}
{{- $n := .Values.nccl -}}
{{- if eq $n.mode "tcp" }}
{{- if gt (mul (int $n.tcp.socketNthreads) (int $n.tcp.nsocksPerThread)) 64 }}
{{- fail (printf "nccl.tcp: socketNthreads * nsocksPerThread = %d, NCCL allows at most 64" (mul (int $n.tcp.socketNthreads) (int $n.tcp.nsocksPerThread))) }}
{{- end }}
- {name: NCCL_NET, value: Socket}
- {name: NCCL_IB_DISABLE, value: "1"}
- {name: NCCL_SOCKET_NTHREADS, value: {{ $n.tcp.socketNthreads | quote }}}
- {name: NCCL_NSOCKS_PERTHREAD, value: {{ $n.tcp.nsocksPerThread | quote }}}
{{- else }}
- {name: NCCL_NET, value: IB}
- {name: NCCL_IB_DISABLE, value: "0"}
{{- with $n.rdma.hca }}
- {name: NCCL_IB_HCA, value: {{ . | quote }}}
{{- end }}
{{- if ne (toString $n.rdma.gidIndex) "" }}
- {name: NCCL_IB_GID_INDEX, value: {{ toString $n.rdma.gidIndex | quote }}}
{{- end }}
{{- end }}
{{- with $n.socketIfname }}
- {name: NCCL_SOCKET_IFNAME, value: {{ . | quote }}}
{{- end }}
{{- with $n.debug }}
- {name: NCCL_DEBUG, value: {{ . | quote }}}
{{- end }}
{{- end -}}

{{- define "dispo-ray.env" -}}
{{ include "dispo-ray.authEnv" . }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- with .Values.secrets.wandb.secretName }}
- name: WANDB_API_KEY
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.secrets.wandb.key | quote }}}
{{- end }}
{{- with .Values.secrets.hfToken.secretName }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.secrets.hfToken.key | quote }}}
{{- end }}
{{- end -}}

{{/* Pod template of one Ray group. Call with dict "root" $ "group" <group values> "gpus" <n> "container" <name>. */}}
{{- define "dispo-ray.podTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
{{- $rdma := and (gt (int .gpus) 0) (eq $root.Values.nccl.mode "rdma") -}}
metadata:
  labels:
    {{- include "dispo-ray.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  securityContext:
    {{- include "dispo-ray.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . | quote }}
    {{- end }}
  {{- end }}
  {{- if eq .component "head" }}
  # the driver runs here: on eviction it finishes its step and saves a checkpoint (trainer.save_on_stop)
  terminationGracePeriodSeconds: {{ $root.Values.head.stopGraceSeconds }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "dispo-ray.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- include "dispo-ray.containerSecurityContext" (dict "root" $root "extraCaps" (ternary (list "IPC_LOCK") list $rdma)) | nindent 8 }}
      env:
        {{- include "dispo-ray.env" $root | trim | nindent 8 }}
        {{- if eq .component "head" }}
        # `ray job stop` waits this long after SIGTERM before SIGKILL (Ray's default: 3 s)
        - {name: RAY_JOB_STOP_WAIT_TIME_S, value: {{ $root.Values.head.stopGraceSeconds | quote }}}
        {{- end }}
        {{- if .gpus }}
        {{- include "dispo-ray.ncclEnv" $root | trim | nindent 8 }}
        {{- end }}
      resources:
        requests:
          {{- toYaml $g.resources.requests | nindent 10 }}
          {{- if .gpus }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
          {{- if $rdma }}
          {{ $root.Values.nccl.rdma.resourceName | quote }}: {{ $root.Values.nccl.rdma.resourcesPerPod }}
          {{- end }}
        limits:
          {{- toYaml $g.resources.limits | nindent 10 }}
          {{- if .gpus }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
          {{- if $rdma }}
          {{ $root.Values.nccl.rdma.resourceName | quote }}: {{ $root.Values.nccl.rdma.resourcesPerPod }}
          {{- end }}
      volumeMounts:
        - {name: dshm, mountPath: /dev/shm}
        - {name: ray-logs, mountPath: /tmp/ray}
        - {name: storage, mountPath: {{ $root.Values.storage.mountPath | quote }}}
  volumes:
    - name: dshm
      emptyDir: {medium: Memory, sizeLimit: {{ $g.shmSize | quote }}}
    - name: ray-logs
      emptyDir: {}
    - name: storage
      {{- if $root.Values.storage.existingClaim }}
      persistentVolumeClaim: {claimName: {{ $root.Values.storage.existingClaim | quote }}}
      {{- else }}
      emptyDir: {}
      {{- end }}
{{- end -}}
