{{/* The release's full name, at most 63 characters (fullnameOverride replaces it). */}}
{{- define "heterotune-site.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "heterotune-site.selectorLabels" -}}
app.kubernetes.io/name: heterotune-site
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "heterotune-site.labels" -}}
{{ include "heterotune-site.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The trainer image: repository@digest, else repository:tag (default appVersion). */}}
{{- define "heterotune-site.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* libtorch threads: threads, else the CPU request rounded down, at least 1. */}}
{{- define "heterotune-site.threads" -}}
{{- if .Values.threads -}}
{{- .Values.threads -}}
{{- else -}}
{{- $cpu := toString (dig "requests" "cpu" "1" .Values.resources) -}}
{{- if hasSuffix "m" $cpu -}}
{{- max 1 (div (trimSuffix "m" $cpu | int) 1000) -}}
{{- else -}}
{{- max 1 (floor ($cpu | float64)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
