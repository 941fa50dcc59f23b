{{/*
Least-privilege RBAC. Each operator chart defines "<chart>.rules": the rules its controllers
need, as a YAML list. They are granted cluster-wide, or only in .Values.watchNamespace when
the operator watches one namespace. Leader election gets its own Role, limited to Leases in the
release namespace.
*/}}
{{- define "gantry.serviceAccount" -}}
{{- if .Values.serviceAccount.create }}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "gantry.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
{{- end }}
{{- end -}}

{{- define "gantry.rbac" -}}
{{- $kind := ternary "Role" "ClusterRole" (not (empty .Values.watchNamespace)) -}}
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ $kind }}
metadata:
  name: {{ include "gantry.fullname" . }}
  {{- with .Values.watchNamespace }}
  namespace: {{ . }}
  {{- end }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
rules:
  - apiGroups: ["events.k8s.io"]
    resources: ["events"]
    verbs: ["create", "patch"]
  {{- include (printf "%s.rules" .Chart.Name) . | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ $kind }}Binding
metadata:
  name: {{ include "gantry.fullname" . }}
  {{- with .Values.watchNamespace }}
  namespace: {{ . }}
  {{- end }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: {{ $kind }}
  name: {{ include "gantry.fullname" . }}
subjects:
  - kind: ServiceAccount
    name: {{ include "gantry.serviceAccountName" . }}
    namespace: {{ .Release.Namespace }}
{{- if include "gantry.webhookRbac" . }}
---
{{ include "gantry.webhookRbac" . }}
{{- end }}
{{- if and (include "gantry.leaderElect" .) (not (include "gantry.nodeAgent" .)) }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ include "gantry.fullname" . }}-leader-election
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
rules:
  - apiGroups: ["coordination.k8s.io"]
    resources: ["leases"]
    verbs: ["get", "create", "update"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ include "gantry.fullname" . }}-leader-election
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ include "gantry.fullname" . }}-leader-election
subjects:
  - kind: ServiceAccount
    name: {{ include "gantry.serviceAccountName" . }}
    namespace: {{ .Release.Namespace }}
{{- end }}
{{- end -}}
