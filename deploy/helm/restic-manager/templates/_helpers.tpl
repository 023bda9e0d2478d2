{{/* Names and labels shared by every template. */}}

{{- define "restic-manager.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "restic-manager.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "restic-manager.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name the existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "restic-manager.agentServiceAccountName" -}}
{{- printf "%s-agent" (include "restic-manager.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "operator"). */}}
{{- define "restic-manager.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "restic-manager.labels" -}}
{{ include "restic-manager.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: restic-manager
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* image reference; call with (dict "root" $ "image" .Values.operator.image). */}}
{{- define "restic-manager.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* The agents' endpoint inside the cluster: the chart's Service. */}}
{{- define "restic-manager.agentServer" -}}
{{- $scheme := ternary "ws" "wss" .Values.operator.insecureListen -}}
{{- default (printf "%s://%s.%s.svc:%d" $scheme (include "restic-manager.fullname" .) .Release.Namespace (int .Values.operator.agentPort)) .Values.agentDaemonSet.server -}}
{{- end -}}

{{/* The Secret with the operator's certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "restic-manager.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "restic-manager.fullname" .)) .Values.operator.tls.secretName -}}
{{- end -}}

{{/* Where the nodes' Agents live. */}}
{{- define "restic-manager.nodeAgentNamespace" -}}
{{- .Values.agentDaemonSet.agentNamespace | default (first .Values.operator.watchNamespaces) | default .Release.Namespace -}}
{{- end -}}

{{/* The namespaces the operator watches, space-separated (empty: every namespace). With the
agent DaemonSet the release's own is one of them: kopf follows the agents' pods there. */}}
{{- define "restic-manager.watchedNamespaces" -}}
{{- $namespaces := .Values.operator.watchNamespaces -}}
{{- if and $namespaces .Values.agentDaemonSet.enabled -}}
{{- $namespaces = append $namespaces .Release.Namespace -}}
{{- end -}}
{{- $namespaces | uniq | join " " -}}
{{- end -}}
