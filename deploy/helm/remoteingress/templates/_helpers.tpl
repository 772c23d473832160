{{- define "remoteingress.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "remoteingress.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "remoteingress.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "remoteingress.tunnelTlsSecret" -}}
{{- default (printf "%s-tunnel-tls" (include "remoteingress.fullname" .)) .Values.tunnelTls.secretName -}}
{{- end -}}

{{- define "remoteingress.adminSecret" -}}
{{- default (printf "%s-admin" (include "remoteingress.fullname" .)) .Values.adminToken.existingSecret -}}
{{- end -}}

{{- define "remoteingress.adminTlsSecret" -}}
{{- default (printf "%s-admin-tls" (include "remoteingress.fullname" .)) .Values.adminTls.secretName -}}
{{- end -}}
