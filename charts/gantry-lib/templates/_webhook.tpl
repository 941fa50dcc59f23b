{{/*
Admission webhooks served by the operator on every replica. Each operator chart with webhooks
defines "<chart>.webhooks": a YAML list of {name, path, rules, objectSelector?}; the library adds
the rest to each: the Service, failure policy, timeout, and a namespaceSelector that always
excludes kube-system, kube-public, kube-node-lease and the release namespace, so the cluster can
never lock itself out (the user's own selector narrows it further, never widens it).

Certificates (webhook.certificates.mode):
- managed: the operator keeps its own CA and serving certificate in a Secret, rotates them and
  keeps the configuration's caBundle current (it may patch only this configuration);
- certManager: a cert-manager Certificate, mounted from its Secret, with the caBundle injected
  by cert-manager's cainjector.
*/}}
{{- define "gantry.webhookEnabled" -}}
{{- if dig "webhook" "enabled" false .Values.AsMap -}}true{{- end -}}
{{- end -}}

{{- define "gantry.webhookConfigurationName" -}}
{{- default (include "gantry.fullname" .) .Values.webhook.configurationName -}}
{{- end -}}

{{- define "gantry.webhookSecretName" -}}
{{- default (printf "%s-webhook-tls" (include "gantry.fullname" .)) .Values.webhook.certificates.secretName -}}
{{- end -}}

{{- define "gantry.webhookServiceName" -}}
{{- printf "%s-webhook" (include "gantry.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Whether the certificate comes from files (cert-manager) rather than the operator. */}}
{{- define "gantry.webhookFiles" -}}
{{- if and (include "gantry.webhookEnabled" .) (eq (dig "webhook" "certificates" "mode" "managed" .Values.AsMap) "certManager") -}}true{{- end -}}
{{- end -}}

{{- define "gantry.webhookArgs" -}}
- --webhook-addr=0.0.0.0:{{ .Values.webhook.port }}
# Keep answering while the Service stops routing here.
- --shutdown-delay-seconds=5
{{- if include "gantry.webhookFiles" . }}
- --tls-cert-file=/tls/tls.crt
- --tls-key-file=/tls/tls.key
{{- else }}
- --tls-secret={{ include "gantry.webhookSecretName" . }}
- --tls-name={{ include "gantry.webhookServiceName" . }}.{{ .Release.Namespace }}.svc
- --tls-webhook-configuration=validating/{{ include "gantry.webhookConfigurationName" . }}
- --tls-validity={{ .Values.webhook.certificates.validity }}
- --tls-ca-validity={{ .Values.webhook.certificates.caValidity }}
{{- end }}
{{- end -}}

{{- define "gantry.webhook" -}}
{{- if include "gantry.webhookEnabled" . }}
{{- $root := . }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "gantry.webhookServiceName" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "gantry.selectorLabels" . | nindent 4 }}
  ports:
    - name: webhook
      port: 443
      targetPort: webhook
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  name: {{ include "gantry.webhookConfigurationName" . }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
  {{- if include "gantry.webhookFiles" . }}
  annotations:
    cert-manager.io/inject-ca-from: {{ .Release.Namespace }}/{{ include "gantry.fullname" . }}-webhook
  {{- end }}
webhooks:
  {{- range include (printf "%s.webhooks" .Chart.Name) . | fromYamlArray }}
  - name: {{ .name }}
    clientConfig:
      service:
        name: {{ include "gantry.webhookServiceName" $root }}
        namespace: {{ $root.Release.Namespace }}
        path: {{ .path }}
        port: 443
    rules:
      {{- toYaml .rules | nindent 6 }}
    {{- with .objectSelector }}
    objectSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    namespaceSelector:
      {{- with $root.Values.webhook.namespaceSelector.matchLabels }}
      matchLabels:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      matchExpressions:
        - key: kubernetes.io/metadata.name
          operator: NotIn
          values: [kube-system, kube-public, kube-node-lease, {{ $root.Release.Namespace }}]
        {{- with $root.Values.webhook.namespaceSelector.matchExpressions }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    failurePolicy: {{ $root.Values.webhook.failurePolicy }}
    sideEffects: None
    admissionReviewVersions: ["v1"]
    timeoutSeconds: {{ $root.Values.webhook.timeoutSeconds }}
  {{- end }}
{{- if include "gantry.webhookFiles" . }}
---
apiVersion: cert-manager.io/v1
kind: Issuer
metadata:
  name: {{ include "gantry.fullname" . }}-webhook
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
spec:
  selfSigned: {}
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: {{ include "gantry.fullname" . }}-webhook
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
spec:
  secretName: {{ include "gantry.webhookSecretName" . }}
  dnsNames:
    - {{ include "gantry.webhookServiceName" . }}.{{ .Release.Namespace }}.svc
  issuerRef:
    name: {{ include "gantry.fullname" . }}-webhook
    kind: Issuer
{{- end }}
{{- end }}
{{- end -}}

{{/*
What a managed certificate authority needs: its own Secret in the release namespace, and the
webhook configuration it keeps current, by name.
*/}}
{{- define "gantry.webhookRbac" -}}
{{- if and (include "gantry.webhookEnabled" .) (not (include "gantry.webhookFiles" .)) }}
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ include "gantry.fullname" . }}-webhook-tls
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
rules:
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: ["create"]
  - apiGroups: [""]
    resources: ["secrets"]
    resourceNames: [{{ include "gantry.webhookSecretName" . | quote }}]
    verbs: ["get", "list", "watch", "update"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ include "gantry.fullname" . }}-webhook-tls
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ include "gantry.fullname" . }}-webhook-tls
subjects:
  - kind: ServiceAccount
    name: {{ include "gantry.serviceAccountName" . }}
    namespace: {{ .Release.Namespace }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: {{ include "gantry.fullname" . }}-webhook-ca-bundle
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
rules:
  - apiGroups: ["admissionregistration.k8s.io"]
    resources: ["validatingwebhookconfigurations"]
    resourceNames: [{{ include "gantry.webhookConfigurationName" . | quote }}]
    verbs: ["get", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ include "gantry.fullname" . }}-webhook-ca-bundle
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ include "gantry.fullname" . }}-webhook-ca-bundle
subjects:
  - kind: ServiceAccount
    name: {{ include "gantry.serviceAccountName" . }}
    namespace: {{ .Release.Namespace }}
{{- end }}
{{- end -}}
