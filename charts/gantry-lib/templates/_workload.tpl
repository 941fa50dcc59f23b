{{/*
The operator Deployment. Restricted pod security by default: non-root, read-only root
filesystem, no capabilities, no privilege escalation, seccomp RuntimeDefault.
*/}}
{{- define "gantry.deployment" -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "gantry.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "gantry.labels" . | nindent 4 }}
spec:
  replicas: {{ .Values.replicas }}
  selector:
    matchLabels:
      {{- include "gantry.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "gantry.labels" . | nindent 8 }}
      {{- with .Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "gantry.serviceAccountName" . }}
      automountServiceAccountToken: true
      terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml .Values.podSecurityContext | nindent 8 }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: operator
          image: {{ include "gantry.image" . | quote }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          args:
            - run
            - --metrics-addr=0.0.0.0:{{ .Values.metrics.port }}
            - --health-addr=0.0.0.0:{{ .Values.health.port }}
            - --log-format={{ .Values.logFormat }}
            - --log-level={{ .Values.logLevel }}
            - --reconcile-interval-ms={{ .Values.reconcileIntervalMs }}
            - --shutdown-timeout-seconds={{ sub (int .Values.terminationGracePeriodSeconds) 5 }}
            {{- if include "gantry.leaderElect" . }}
            - --leader-elect
            - --lease-name={{ include "gantry.fullname" . }}
            - --lease-namespace={{ .Release.Namespace }}
            {{- end }}
            {{- with .Values.watchNamespace }}
            - --namespace={{ . }}
            {{- end }}
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: POD_NAMESPACE
              valueFrom:
                fieldRef:
                  fieldPath: metadata.namespace
          ports:
            - name: metrics
              containerPort: {{ .Values.metrics.port }}
            - name: health
              containerPort: {{ .Values.health.port }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: health
            periodSeconds: 10
            failureThreshold: 3
          readinessProbe:
            httpGet:
              path: /readyz
              port: health
            periodSeconds: 5
          resources:
            {{- toYaml .Values.resources | nindent 12 }}
          securityContext:
            {{- toYaml .Values.containerSecurityContext | nindent 12 }}
      {{- with .Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if gt (int .Values.replicas) 1 }}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "gantry.selectorLabels" . | nindent 14 }}
      {{- end }}
{{- end -}}
