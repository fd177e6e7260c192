{{/* Chart name, at most 63 characters. */}}
{{- define "kubelock.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, with the chart name appended unless it already contains it.
Names derived from it add suffixes of up to 11 characters, so it is cut at 52.
*/}}
{{- define "kubelock.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart label value: name-version. */}}
{{- define "kubelock.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the controller pods. */}}
{{- define "kubelock.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubelock.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{/* Selector labels of the webhook pods. */}}
{{- define "kubelock.webhookSelectorLabels" -}}
app.kubernetes.io/name: {{ include "kubelock.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end }}

{{/* Labels of every object; $component names its part (controller, rbac, crds). */}}
{{- define "kubelock.labels" -}}
{{- $ := index . 0 }}
{{- $component := index . 1 -}}
helm.sh/chart: {{ include "kubelock.chart" $ }}
app.kubernetes.io/name: {{ include "kubelock.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ $component }}
app.kubernetes.io/part-of: kubelock
app.kubernetes.io/version: {{ $.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $.Release.Service }}
{{- with $.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The controller's ServiceAccount. */}}
{{- define "kubelock.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-controller" (include "kubelock.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The controller image reference: repository@digest or repository:tag. */}}
{{- define "kubelock.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The leader-election Lease: name and namespace. */}}
{{- define "kubelock.leaseName" -}}
{{- default (printf "%s-controller" (include "kubelock.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}
{{- define "kubelock.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.namespace }}
{{- end }}

{{/*
The sidecar container that holds a lock for the pod it runs in. Copy the output into a
pod's `containers` (with the volume from "kubelock.sidecarVolume"), or include it from a
chart that depends on this one:

  containers:
    - name: app
      ...
      volumeMounts:
        - {name: kubelock, mountPath: /var/run/kubelock, readOnly: true}
    {{- include "kubelock.sidecar" (dict "lock" "my-lock" "image" "ghcr.io/kubelock/kubelock:0.1.0" "root" .) | nindent 4 }}
  volumes:
    {{- include "kubelock.sidecarVolume" . | nindent 4 }}

Parameters (a dict): lock (required), root (the template context), image (required when
included from another chart; this chart defaults to its own image), and optionally port,
dir, permits, lease (a Go duration). The pod's ServiceAccount needs the
"<fullname>-requester" role in the pod's namespace.

The sidecar's readiness probe makes the pod Ready only while it holds the lock, so a
Service sends traffic only to the holder (active/passive); the fencing token is in
<dir>/token while holding. The downward API passes the pod's identity: the LockRequest
names the pod (spec.podRef), so the controller releases the lock as soon as the pod is gone.
*/}}
{{- define "kubelock.sidecar" -}}
{{- $root := .root }}
{{- /* Defaults from this chart's values only when rendered by this chart itself. */ -}}
{{- $own := and $root (eq $root.Chart.Name "kubelock") }}
{{- $values := dict }}
{{- if $own }}
{{- $values = $root.Values.sidecar }}
{{- end }}
{{- $image := .image | default $values.image }}
{{- if and (not $image) $own }}
{{- $image = include "kubelock.image" $root }}
{{- end }}
{{- $port := .port | default $values.port | default 8081 }}
{{- $dir := .dir | default $values.dir | default "/var/run/kubelock" -}}
- name: kubelock
  image: {{ required "kubelock.sidecar: image is required" $image }}
  args:
    - sidecar
    - --lock={{ required "kubelock.sidecar: lock is required" .lock }}
    - --dir={{ $dir }}
    - --listen=0.0.0.0:{{ $port }}
    {{- with .permits }}
    - --permits={{ . }}
    {{- end }}
    {{- with .lease }}
    - --lease={{ . }}
    {{- end }}
  env:
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: POD_NAMESPACE
      valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
    - name: POD_UID
      valueFrom: {fieldRef: {fieldPath: metadata.uid}}
  ports:
    - {name: kubelock, containerPort: {{ $port }}}
  readinessProbe:
    httpGet: {path: /readyz, port: kubelock}
    periodSeconds: 1
    failureThreshold: 1
  livenessProbe:
    httpGet: {path: /healthz, port: kubelock}
    periodSeconds: 10
  volumeMounts:
    - {name: kubelock, mountPath: {{ $dir }}}
  resources:
    {{- toYaml ($values.resources | default (dict "requests" (dict "cpu" "10m" "memory" "16Mi") "limits" (dict "memory" "64Mi"))) | nindent 4 }}
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    runAsNonRoot: true
    runAsUser: 65532
    capabilities: {drop: [ALL]}
    seccompProfile: {type: RuntimeDefault}
{{- end }}

{{/* The emptyDir shared by the sidecar and the application. */}}
{{- define "kubelock.sidecarVolume" -}}
- name: kubelock
  emptyDir: {medium: Memory, sizeLimit: 1Mi}
{{- end }}
