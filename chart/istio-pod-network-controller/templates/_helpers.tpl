{{/* Name of the chart (label value). */}}
{{- define "ipnc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of every object: the chart name unless overridden, independent of the release name. */}}
{{- define "ipnc.fullname" -}}
{{- default .Chart.Name .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/* Namespace: the 2018 `Namespace` value, or the release namespace when it is empty. */}}
{{- define "ipnc.namespace" -}}
{{- default .Release.Namespace .Values.Namespace -}}
{{- end -}}

{{- define "ipnc.openshift" -}}
{{- if eq (toString .Values.kubernetesDistribution) "OpenShift" }}true{{ end -}}
{{- end -}}

{{- define "ipnc.labels" -}}
app.kubernetes.io/name: {{ include "ipnc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: istio
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* Selector labels: stable across releases (a DaemonSet's selector cannot change). */}}
{{- define "ipnc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ipnc.name" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ipnc.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion (toString .Values.image.tag)) -}}
{{- end -}}

{{/*
Capture-default flags shared by the controller and the waiter: the modern `interception` values, then the
2018 names (includeIPRanges, excludeIPRanges, excludeInboundPorts) where the modern one is empty.
*/}}
{{- define "ipnc.interceptionArgs" -}}
{{- $i := .Values.interception -}}
{{- $flags := list
  (list "--interception-mode" $i.mode)
  (list "--envoy-port" $i.envoyPort)
  (list "--outbound-port" $i.outboundPort)
  (list "--inbound-port" $i.inboundPort)
  (list "--proxy-uid" $i.proxyUID)
  (list "--proxy-gid" $i.proxyGID)
  (list "--include-inbound-ports" $i.includeInboundPorts)
  (list "--exclude-inbound-ports" (default .Values.excludeInboundPorts $i.excludeInboundPorts))
  (list "--include-outbound-ip-ranges" (default .Values.includeIPRanges $i.includeOutboundIPRanges))
  (list "--exclude-outbound-ip-ranges" (default .Values.excludeIPRanges $i.excludeOutboundIPRanges))
  (list "--include-outbound-ports" $i.includeOutboundPorts)
  (list "--exclude-outbound-ports" $i.excludeOutboundPorts)
  (list "--exclude-interfaces" $i.excludeInterfaces)
  (list "--reroute-virtual-interfaces" $i.rerouteVirtualInterfaces)
  (list "--capture-dns" $i.captureDNS)
  (list "--ipv6" $i.ipv6)
  (list "--drop-invalid" $i.dropInvalid)
  (list "--outbound-owner-groups" $i.outboundOwnerGroups)
  (list "--outbound-owner-groups-exclude" $i.outboundOwnerGroupsExclude)
-}}
{{- range $flags }}
{{- $value := toString (index . 1) }}
{{- if and (ne $value "") (ne $value "<nil>") }}
- {{ printf "%s=%s" (index . 0) $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The proxy uid/gid the waiter runs as (it must equal the proxy's for its loopback probe). */}}
{{- define "ipnc.proxyUID" -}}
{{- default "1337" (toString .Values.interception.proxyUID) -}}
{{- end -}}
{{- define "ipnc.proxyGID" -}}
{{- default "1337" (toString .Values.interception.proxyGID) -}}
{{- end -}}

{{/* The waiter init container (injection template): same shape as src/istio_pod_network_controller/install/injection.py. */}}
{{- define "ipnc.waiterContainer" -}}
name: istio-pod-network-wait
image: {{ include "ipnc.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args:
  - wait
  - --file
  - /etc/podinfo/pod_annotations
  - --timeout
  - {{ .Values.waiter.timeout | quote }}
  - --controller-namespace
  - {{ include "ipnc.namespace" . | quote }}
{{- with include "ipnc.interceptionArgs" . | trim }}
{{- . | nindent 2 }}
{{- end }}
resources:
  {{- toYaml .Values.waiter.resources | nindent 2 }}
securityContext:
  runAsUser: {{ include "ipnc.proxyUID" . }}
  runAsGroup: {{ include "ipnc.proxyGID" . }}
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  privileged: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
terminationMessagePolicy: FallbackToLogsOnError
volumeMounts:
  - name: podinfo
    mountPath: /etc/podinfo
    readOnly: true
{{- end -}}
