{{/* Names, labels, image references and the operator's RBAC rules, shared by the templates. */}}

{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release-qualified name every resource is named after (63 characters at most, a DNS label). */}}
{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: finetune-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "finetune-operator.leaseName" -}}
{{- default (printf "%s-leader" (include "finetune-operator.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: the digest wins; the tag defaults to appVersion. */}}
{{- define "finetune-operator.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
Every namespaced permission the operator uses, in each watched namespace (or cluster-wide). docs/install.md
explains each rule; tests/helm/test_helm_rbac.py compares them with what the operator's code does and with what the
API server saw it do.
*/}}
{{- define "finetune-operator.rules" -}}
# Watch FineTuneJobs (kopf event handlers only: no annotations, no finalizers), read them, delete finished ones (TTL).
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "delete"]
# Write status (server-side apply of the operator's fields); "get" as well because the per-job trainer Role grants get+patch on it, and RBAC only lets the
# operator grant what it holds.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch"]
# Children carry an ownerReference with blockOwnerDeletion; clusters that enforce OwnerReferencesPermission
# (OpenShift, hardened distributions) require the right to set finalizers on the owner for that.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# Children: the trainer ConfigMap, the per-job ServiceAccount, the headless Service of the Job backend.
# "get" reads each child before it is created, and checks its controller (a same-named object is never adopted).
- apiGroups: [""]
  resources: ["configmaps", "serviceaccounts", "services"]
  verbs: ["get", "create"]
# The per-job Role (this job's status only) and its RoleBinding.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create"]
# Training replicas' Pods: status comes from them (exit codes, OOMKilled, scheduling trouble).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Kubernetes Events on FineTuneJobs.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# The workloads: an Indexed Job (built-in backend), a Kubeflow PyTorchJob or a Kubeflow Trainer v2 TrainJob;
# patch is suspend/resume (and stopping a run that exceeded its backoffLimit).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The run's progress, also in the TrainJob's own status.trainerStatus (server-side apply).
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs/status"]
  verbs: ["patch"]
# A TrainJob's JobSet: its restarts count against runPolicy.backoffLimit, and its uid finds the run's Pods.
- apiGroups: ["jobset.x-k8s.io"]
  resources: ["jobsets"]
  verbs: ["get"]
{{- end }}

{{/*
Cluster-scoped reads kopf makes to observe the cluster (rbac.observeCluster): CRDs always; Namespaces only when it
watches a list of namespaces (cluster-wide it needs no namespace list).
*/}}
{{- define "finetune-operator.clusterRules" -}}
# kopf re-reads the served APIs when CRDs change (e.g. the training operator's PyTorchJob CRD appears).
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watchNamespaces }}
# kopf lists and watches Namespaces before it watches the ones it was given.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
