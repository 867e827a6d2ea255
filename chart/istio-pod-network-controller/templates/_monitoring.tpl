{{/* The Prometheus job of the controller pods: the ServiceMonitor's Service name (the operator's default). */}}
{{- define "ipnc.metricsJob" -}}
{{- printf "%s-metrics" (include "ipnc.fullname" .) -}}
{{- end -}}

{{/*
The alert rules (the PrometheusRule's spec; tests/install/test_observability.py feeds them to promtool and to a
real Prometheus). Metric names: src/istio_pod_network_controller/controller/metrics.py.
*/}}
{{- define "ipnc.alertGroups" -}}
{{- $r := .Values.monitoring.prometheusRule -}}
{{- $sel := printf "job=%q" (include "ipnc.metricsJob" .) -}}
groups:
  - name: istio-pod-network-controller
    rules:
      - alert: IPNCPodsStuckUninitialized
        # The work queue was never empty for the whole window (a pod retries: no netns yet, a failing apply),
        # or a pod was given up on (netns deadline passed, or an annotation the controller refuses): mesh pods
        # on that node stay in Init until this is fixed.
        expr: |
          min_over_time(istio_pod_network_controller_queue_depth{ {{- $sel -}} }[{{ $r.stuckFor }}]) > 0
          or
          sum by (namespace, pod, node, reason) (increase(istio_pod_network_controller_pods_failed_total{ {{- $sel -}}, reason=~"netns_not_found|invalid_config"}[{{ $r.stuckFor }}])) > 0
        labels:
          severity: warning
        annotations:
          summary: Mesh pods on node {{ "{{" }} $labels.node {{ "}}" }} are not being initialized
          description: >-
            Pods wait for capture rules on node {{ "{{" }} $labels.node {{ "}}" }} (queue never empty for
            {{ $r.stuckFor }}, or given up: {{ "{{" }} $labels.reason {{ "}}" }}); their waiter keeps them in Init.
            The pods' Events (`kubectl describe pod`) and the controller's log say why.
      - alert: IPNCApplyFailures
        # Applying rules or marking a pod failed until the pod's deadline, or the reconcile crashed.
        expr: |
          sum by (namespace, pod, node, reason) (increase(istio_pod_network_controller_pods_failed_total{ {{- $sel -}}, reason=~"apply_error|patch_error|internal"}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: Capture rules fail to apply on node {{ "{{" }} $labels.node {{ "}}" }} ({{ "{{" }} $labels.reason {{ "}}" }})
          description: >-
            {{ "{{" }} $value | humanize {{ "}}" }} pod(s) failed with {{ "{{" }} $labels.reason {{ "}}" }} in 10 minutes on node
            {{ "{{" }} $labels.node {{ "}}" }}; the controller's log and the pods' InterceptionFailed Events name the error.
      - alert: IPNCWatchRestarts
        # Closed and expired watches are routine; inactivity and HTTP errors mean the API is hard to reach.
        expr: |
          sum by (namespace, pod, node, resource) (increase(istio_pod_network_controller_watch_restarts_total{ {{- $sel -}}, reason!~"closed|expired"}[15m])) > {{ $r.watchRestartThreshold }}
        labels:
          severity: warning
        annotations:
          summary: The controller on node {{ "{{" }} $labels.node {{ "}}" }} keeps losing its {{ "{{" }} $labels.resource {{ "}}" }} watch
          description: >-
            {{ "{{" }} $value | humanize {{ "}}" }} watch restarts (inactivity or HTTP errors) in 15 minutes: new pods on that
            node may wait for the next relist. Check the API server and the network path from the node.
      - alert: IPNCControllerNotReady
        # Not ready (initial sync not done) or not scraped at all: mesh pods on that node cannot start.
        expr: |
          istio_pod_network_controller_ready{ {{- $sel -}} } == 0 or up{ {{- $sel -}} } == 0
        for: {{ $r.notReadyFor }}
        labels:
          severity: critical
        annotations:
          summary: The controller on node {{ "{{" }} $labels.node {{ "}}" }} is not ready
          description: >-
            {{ "{{" }} $labels.pod {{ "}}" }} has not been ready (or reachable) for {{ $r.notReadyFor }}: new mesh pods on node
            {{ "{{" }} $labels.node {{ "}}" }} stay in Init. See its log and `istio-pod-network-controller check`.
{{- end -}}
