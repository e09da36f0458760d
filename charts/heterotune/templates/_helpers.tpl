{{/* The chart's name (nameOverride replaces it). */}}
{{- define "heterotune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name, at most 63 characters (fullnameOverride replaces it). */}}
{{- define "heterotune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "heterotune.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "heterotune.labels" -}}
app.kubernetes.io/name: heterotune-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "heterotune.selectorLabels" -}}
app.kubernetes.io/name: heterotune-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "heterotune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "heterotune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
An image reference: (global.imageRegistry or the repository's own registry)/
repository, then @digest when one is given, else :tag. The operator and the
trainer share one tag: image.tag, default the chart's appVersion.
Call with (dict "repository" R "digest" D "root" $).
*/}}
{{- define "heterotune.imageRef" -}}
{{- $repo := .repository -}}
{{- with .root.Values.global.imageRegistry -}}
{{- $parts := splitList "/" $repo -}}
{{- if and (gt (len $parts) 1) (or (contains "." (first $parts)) (contains ":" (first $parts)) (eq (first $parts) "localhost")) -}}
{{- $repo = join "/" (rest $parts) -}}
{{- end -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo -}}
{{- end -}}
{{- if .digest -}}
{{- printf "%s@%s" $repo .digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "heterotune.image" -}}
{{- include "heterotune.imageRef" (dict "repository" .Values.image.repository "digest" .Values.image.digest "root" .) -}}
{{- end -}}

{{/* The trainer image the Jobs run: config.jobs.trainerImage when set, else trainerImage.* with image.tag. */}}
{{- define "heterotune.trainerImage" -}}
{{- default (include "heterotune.imageRef" (dict "repository" .Values.trainerImage.repository "digest" .Values.trainerImage.digest "root" .)) .Values.config.jobs.trainerImage -}}
{{- end -}}

{{/* Pull secret names: global.imagePullSecrets, then imagePullSecrets ({name: ...} objects). */}}
{{- define "heterotune.pullSecretNames" -}}
{{- $names := list -}}
{{- range (concat (.Values.global.imagePullSecrets | default list) (.Values.imagePullSecrets | default list)) -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- toJson ($names | uniq) -}}
{{- end -}}
