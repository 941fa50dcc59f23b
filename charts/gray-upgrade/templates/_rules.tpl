{{/*
What the GrayApp controller needs: its own resources and their status; the pods, claims and
revisions it owns; pod status for the readiness gate. Nothing else.
*/}}
{{- define "gray-upgrade.rules" -}}
- apiGroups: ["apps.gantry.dev"]
  resources: ["grayapps"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps.gantry.dev"]
  resources: ["grayapps/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
- apiGroups: [""]
  resources: ["pods/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create"]
- apiGroups: ["apps"]
  resources: ["controllerrevisions"]
  verbs: ["get", "list", "watch", "create", "delete"]
{{- end -}}

{{/* The operator has no flags of its own. */}}
{{- define "gray-upgrade.args" -}}
[]
{{- end -}}
