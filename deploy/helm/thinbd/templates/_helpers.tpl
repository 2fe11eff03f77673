{{/* The thinbd image (both binaries). */}}
{{- define "thinbd.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
A volume named "tls" with the certificate files `keys` (e.g. ca.crt, server.crt, server.key):
from the one Secret deploy/tls/make-certs.sh writes, or, with cert-manager, projected from the
Secrets of its Certificates (tls.crt/tls.key of the server, client or snapshot-metadata one).
Call with (dict "root" $ "name" "tls" "keys" (list ...)).
*/}}
{{- define "thinbd.tlsVolume" -}}
{{- $v := .root.Values.tls -}}
- name: {{ .name }}
{{- if $v.certManager.enabled }}
  projected:
    defaultMode: 256  # 0400: decimal, which YAML 1.1 and 1.2 read alike
    sources:
{{- range .keys }}
{{- $parts := splitList "." . }}
{{- $who := index $parts 0 }}
{{- if eq $who "ca" }}
      - secret: {name: {{ $v.secretName }}-server, items: [{key: ca.crt, path: ca.crt}]}
{{- else }}
      - secret: {name: {{ $v.secretName }}-{{ $who }}, items: [{key: tls.{{ index $parts 1 }}, path: {{ . }}}]}
{{- end }}
{{- end }}
{{- else }}
  secret:
    secretName: {{ $v.secretName }}
    defaultMode: 256  # 0400: decimal, which YAML 1.1 and 1.2 read alike
    items:
{{- range .keys }}
      - {key: {{ . }}, path: {{ . }}}
{{- end }}
{{- end }}
{{- end }}

{{/* Scheduling and resources of a pod: (dict "root" $ "of" .Values.storage). */}}
{{- define "thinbd.podExtras" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .of.tolerations }}
tolerations:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A sidecar's resources, when set. */}}
{{- define "thinbd.sidecarResources" -}}
{{- with .Values.sidecars.resources }}
resources:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
