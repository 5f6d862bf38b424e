"""A real Kubernetes control plane for tests: etcd and kube-apiserver on random loopback ports.

Authentication is by client certificate (an admin in ``system:masters``) and service-account tokens, with
``--authorization-mode=Node,RBAC``. kube-controller-manager, kube-scheduler, kwok (fake GPU nodes) and the
Kubeflow training operator start on demand, once, when a test first needs them. All state lives in a temporary
work directory that :meth:`ControlPlane.stop` removes.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import shutil
import ssl
import threading
import time
import urllib.request
from base64 import b64encode
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client import ApiException
from kubernetes.dynamic import DynamicClient

from . import kwok, pki, testbin
from .processes import ManagedProcess, free_port, wait_until

ADMIN_USER = "ftj-admin"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
TRAINING_OPERATOR_NAMESPACE = "kubeflow"
WEBHOOK_SECRET = "training-operator-webhook-cert"
# What the training operator's rotator (pkg/cert, cert-controller) expects: the CA's name, the webhook Service's
# DNS name, and certificates valid beyond its 90-day look-ahead, or it replaces them.
WEBHOOK_CA_NAME = "training-operator-ca"
WEBHOOK_DNS_NAME = f"training-operator.{TRAINING_OPERATOR_NAMESPACE}.svc"
WEBHOOK_CERT_VALIDITY = datetime.timedelta(days=365)
# Fixed in the training operator's pkg/cert: where its rotator checks that certificates are mounted.
WEBHOOK_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
KWOK_GPUS_PER_NODE = 32
START_TIMEOUT = float(os.environ.get("FTJ_CONTROLPLANE_START_TIMEOUT", "120"))


def _ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=3, context=context) as response:
        return bool(response.status == 200)


class ControlPlane:
    """etcd + kube-apiserver, plus optional components started by the ``ensure_*`` methods."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.timings: dict[str, float] = {}
        self._processes: dict[str, ManagedProcess] = {}
        self._lock = threading.RLock()
        self._pki_dir = workdir / "pki"
        self._ca = pki.CertificateAuthority(self._pki_dir)
        self.ca_cert = self._ca.cert_path
        self._serving = self._ca.issue(
            "serving",
            "ftj-test-serving",
            dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            ip_addresses=("127.0.0.1", "10.96.0.1"),
            server=True,
        )
        self._admin = self._ca.issue("admin", ADMIN_USER, organizations=("system:masters",), client=True)
        self._sa_keys = pki.service_account_keys(self._pki_dir)
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = workdir / "admin.kubeconfig"
        self._write_kubeconfig()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, workdir: Path, *, apiserver_args: Sequence[str] = ()) -> ControlPlane:
        """Start etcd and kube-apiserver in ``workdir`` and wait until the API server is ready.

        ``apiserver_args`` are appended to kube-apiserver's flags (e.g. an audit log, more admission plugins).
        """
        etcd_bin = testbin.binary("etcd")
        apiserver_bin = testbin.binary("kubernetes", "kube-apiserver")
        plane = cls(workdir)
        try:
            plane._start_etcd(etcd_bin)
            plane._start_apiserver(apiserver_bin, apiserver_args)
        except BaseException:
            plane.stop(keep_workdir=True)
            raise
        return plane

    def stop(self, *, keep_workdir: bool = False) -> None:
        """Stop every component (dependents first) and remove the work directory unless asked to keep it."""
        with self._lock:
            for name in reversed(list(self._processes)):
                self._processes[name].stop()
            self._processes.clear()
        if not keep_workdir and not os.environ.get("FTJ_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> dict[str, Path]:
        """Log file of each component started so far."""
        return {name: proc.log_path for name, proc in self._processes.items()}

    def _spawn(
        self, name: str, argv: list[str | os.PathLike[str]], env: dict[str, str] | None = None
    ) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.workdir / "logs" / f"{name}.log", env=env, cwd=self.workdir)
        self._processes[name] = proc
        return proc.start()

    def _start_etcd(self, etcd_bin: Path) -> None:
        started = time.monotonic()
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        proc = self._spawn(
            "etcd",
            [
                etcd_bin,
                "--name=ftj-test",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=ftj-test={peer_url}",
                # Throw-away data: durability costs seconds on every write and buys nothing here.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        wait_until(lambda: _ok(f"{self.etcd_url}/health"), timeout=START_TIMEOUT, what="etcd /health", watch=[proc])
        self.timings["etcd"] = time.monotonic() - started

    def _start_apiserver(self, apiserver_bin: Path, extra_args: Sequence[str] = ()) -> None:
        started = time.monotonic()
        proc = self._spawn(
            "kube-apiserver",
            [
                apiserver_bin,
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={self._serving.cert}",
                f"--tls-private-key-file={self._serving.key}",
                f"--client-ca-file={self.ca_cert}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={self._sa_keys.cert}",
                f"--service-account-signing-key-file={self._sa_keys.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
                *extra_args,
            ],
        )
        context = self.ssl_context()
        wait_until(
            lambda: _ok(f"{self.server}/readyz", context),
            timeout=START_TIMEOUT,
            what="kube-apiserver /readyz",
            watch=[proc],
        )
        self.timings["kube-apiserver"] = time.monotonic() - started

    # -- clients -------------------------------------------------------------------------------------------------

    def _write_kubeconfig(self) -> None:
        def b64(path: Path) -> str:
            return b64encode(path.read_bytes()).decode()

        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "ftj-test",
                    "cluster": {"server": self.server, "certificate-authority-data": b64(self.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": ADMIN_USER,
                    "user": {
                        "client-certificate-data": b64(self._admin.cert),
                        "client-key-data": b64(self._admin.key),
                    },
                }
            ],
            "contexts": [{"name": "ftj-test", "context": {"cluster": "ftj-test", "user": ADMIN_USER}}],
            "current-context": "ftj-test",
        }
        self.kubeconfig.write_text(yaml.safe_dump(doc))
        self.kubeconfig.chmod(0o600)

    def ssl_context(self) -> ssl.SSLContext:
        """TLS context that trusts the test CA and presents the admin client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        context.load_cert_chain(str(self._admin.cert), str(self._admin.key))
        return context

    def api_client(self) -> client.ApiClient:
        """A new kubernetes ApiClient authenticated as the cluster admin (leaves the global config alone)."""
        api: client.ApiClient = config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]
        return api

    def token_client(self, token: str) -> client.ApiClient:
        """A new ApiClient that authenticates with a bearer ``token`` (e.g. from a TokenRequest)."""
        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.ca_cert)
        configuration.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(configuration)

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A bound token for a ServiceAccount (TokenRequest), the credential a Pod running as it would get."""
        result = self.request(
            "post",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": seconds}},
        )
        token: str = result["status"]["token"]
        return token

    def token_kubeconfig(self, token: str, path: Path, user: str = "token-user") -> Path:
        """Write a kubeconfig that authenticates with a bearer ``token`` (mode 0600) and return its path."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "ftj-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64encode(self.ca_cert.read_bytes()).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "ftj-test", "context": {"cluster": "ftj-test", "user": user}}],
            "current-context": "ftj-test",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path

    # -- CRDs ----------------------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A raw JSON API request as the admin, e.g. ``request("get", "/api/v1/nodes")``.

        No client-side model validation: the API server alone judges the body. ``headers`` (such as an ``Accept``
        asking for a Table) and query ``params`` are passed through; errors raise ``ApiException`` subclasses.
        """
        with self.api_client() as api:
            dynamic = DynamicClient(api, cache_file=str(self.workdir / "discovery-cache.json"))  # type: ignore[no-untyped-call]
            response = dynamic.request(
                method,
                path,
                body=body,
                header_params=dict(headers or {}),
                query_params=list((params or {}).items()),
                serialize=False,
            )
            result: dict[str, Any] = json.loads(response.data or b"{}")
            return result

    def create(self, path: str, body: dict[str, Any]) -> bool:
        """POST ``body`` to the collection at ``path``; an object that already exists counts as success.

        Returns True when it was created now, False when it was already there.
        """
        try:
            self.request("post", path, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            return False
        return True

    def apply_crds(self, documents: Iterable[dict[str, Any]], *, timeout: float = 60) -> list[str]:
        """Create or replace each CustomResourceDefinition and wait until all are Established."""
        path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        names: list[str] = []
        for doc in documents:
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            name = doc["metadata"]["name"]
            try:
                self.request("post", path, doc)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                current = self.request("get", f"{path}/{name}")
                version = current["metadata"]["resourceVersion"]
                self.request(
                    "put", f"{path}/{name}", {**doc, "metadata": {**doc["metadata"], "resourceVersion": version}}
                )
            names.append(name)

        def established(name: str) -> bool:
            conditions = self.request("get", f"{path}/{name}").get("status", {}).get("conditions", [])
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        for name in names:
            wait_until(functools.partial(established, name), timeout=timeout, what=f"CRD {name} Established")
        return names

    def apply_crd_files(self, paths: Iterable[Path]) -> list[str]:
        """Apply every CRD document found in the given YAML files; a rejected CRD names its file."""
        names: list[str] = []
        for path in paths:
            documents = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
            try:
                names += self.apply_crds(documents)
            except ApiException as exc:
                raise RuntimeError(f"kube-apiserver rejected a CRD in {path}: HTTP {exc.status}: {exc.body}") from exc
        return names

    # -- optional components -------------------------------------------------------------------------------------

    def _component_argv_common(self, port: int) -> list[str | os.PathLike[str]]:
        serving = self._ca.issue(
            f"serving-{port}", "ftj-test-component", dns_names=("localhost",), ip_addresses=("127.0.0.1",), server=True
        )
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}",
            "--leader-elect=false",
            "--v=1",
        ]

    def _wait_healthz(self, proc: ManagedProcess, port: int) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        wait_until(
            lambda: _ok(f"https://127.0.0.1:{port}/healthz", context),
            timeout=START_TIMEOUT,
            what=f"{proc.name} /healthz",
            watch=[proc],
        )

    def ensure_controller_manager(self) -> ManagedProcess:
        """Start kube-controller-manager (all default controllers, incl. job, GC, service accounts) once."""
        with self._lock:
            if "kube-controller-manager" in self._processes:
                return self._processes["kube-controller-manager"]
            binary = testbin.binary("kubernetes", "kube-controller-manager")
            started = time.monotonic()
            port = free_port()
            proc = self._spawn(
                "kube-controller-manager",
                [
                    binary,
                    *self._component_argv_common(port),
                    f"--service-account-private-key-file={self._sa_keys.key}",
                    f"--root-ca-file={self.ca_cert}",
                    "--use-service-account-credentials=true",
                    "--cluster-name=ftj-test",
                    f"--cluster-signing-cert-file={self.ca_cert}",
                    f"--cluster-signing-key-file={self._ca.key_path}",
                ],
            )
            self._wait_healthz(proc, port)
            self.timings["kube-controller-manager"] = time.monotonic() - started
            return proc

    def ensure_scheduler(self) -> ManagedProcess:
        """Start kube-scheduler once."""
        with self._lock:
            if "kube-scheduler" in self._processes:
                return self._processes["kube-scheduler"]
            binary = testbin.binary("kubernetes", "kube-scheduler")
            started = time.monotonic()
            port = free_port()
            proc = self._spawn("kube-scheduler", [binary, *self._component_argv_common(port)])
            self._wait_healthz(proc, port)
            self.timings["kube-scheduler"] = time.monotonic() - started
            return proc

    # 32 GPUs a node: a finished test's namespace (and the GPUs its pods hold) is deleted in the background while the
    # next test runs, so a session needs headroom beyond what one test asks for (up to 8 replicas).
    def ensure_kwok(self, nodes: int = 2, gpus_per_node: int = KWOK_GPUS_PER_NODE) -> ManagedProcess:
        """Start kwok and register ``nodes`` fake nodes with GPUs; return once every node is Ready."""
        with self._lock:
            if "kwok" in self._processes:
                return self._processes["kwok"]
            binary = testbin.binary("kwok")
            started = time.monotonic()
            proc = self._spawn(
                "kwok",
                [
                    binary,
                    f"--kubeconfig={self.kubeconfig}",
                    f"--config={kwok.STAGES_FILE}",
                    # Only the fake nodes (kwok.fake_node carries this annotation): the e2e tier's node agent plays
                    # the kubelet of Nodes of its own, which kwok must leave alone.
                    f"--manage-nodes-with-annotation-selector={kwok.MANAGED_ANNOTATION}={kwok.MANAGED_VALUE}",
                    f"--cidr={POD_CIDR}",
                    "--node-ip=10.240.0.1",
                    f"--server-address=127.0.0.1:{free_port()}",
                    "--node-lease-duration-seconds=40",
                ],
            )
            names = [f"kwok-gpu-{i}" for i in range(nodes)]
            for name in names:
                self.create("/api/v1/nodes", kwok.fake_node(name, gpus=gpus_per_node))

            def all_ready() -> bool:
                for name in names:
                    node = self.request("get", f"/api/v1/nodes/{name}")
                    conditions = node.get("status", {}).get("conditions", [])
                    if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                        return False
                return True

            wait_until(all_ready, timeout=START_TIMEOUT, what="kwok nodes Ready", watch=[proc])
            self.timings["kwok"] = time.monotonic() - started
            return proc

    def ensure_training_operator(self) -> ManagedProcess:
        """Apply the upstream PyTorchJob CRD from the Go module cache and start the training operator v1 once.

        It runs out of cluster with the admin kubeconfig. No ValidatingWebhookConfiguration is registered, so
        admission goes to the CRD schema only; its webhook server still starts and needs certificates (see
        ``_prepare_webhook_certs``).
        """
        with self._lock:
            if "training-operator" in self._processes:
                return self._processes["training-operator"]
            binary = testbin.binary("training-operator", "training-operator.v1")
            crd = testbin.training_operator_crd("pytorchjobs")
            started = time.monotonic()
            self.apply_crd_files([crd])
            self.create("/api/v1/namespaces", {"metadata": {"name": TRAINING_OPERATOR_NAMESPACE}})
            tmpdir = self._prepare_webhook_certs()
            probe_port = free_port()
            env = {
                **os.environ,
                "KUBECONFIG": str(self.kubeconfig),
                "MY_POD_NAMESPACE": TRAINING_OPERATOR_NAMESPACE,
                # controller-runtime's webhook server reads $TMPDIR/k8s-webhook-server/serving-certs.
                "TMPDIR": str(tmpdir),
            }
            proc = self._spawn(
                "training-operator",
                [
                    binary,
                    "--enable-scheme=pytorchjob",
                    "--metrics-bind-address=0",
                    f"--health-probe-bind-address=127.0.0.1:{probe_port}",
                    f"--webhook-server-port={free_port()}",
                    "--leader-elect=false",
                ],
                env=env,
            )
            wait_until(
                lambda: _ok(f"http://127.0.0.1:{probe_port}/readyz"),
                timeout=START_TIMEOUT,
                what="training-operator /readyz",
                watch=[proc],
            )
            self.timings["training-operator"] = time.monotonic() - started
            return proc

    def ensure_trainer_v2(self) -> ManagedProcess:
        """Kubeflow Trainer v2 with JobSet underneath, once: their upstream CRDs from the Go module cache, the JobSet
        controller and the trainer controller manager (out of cluster, admin kubeconfig, leader election off).

        As for the training operator v1, no webhook configurations are registered (admission is the CRDs' schemas
        and CEL rules) and each controller's certificate management is off: their webhook servers still start and
        read a serving pair the test issues into a directory of their own.
        """
        with self._lock:
            if "trainer-v2" in self._processes:
                return self._processes["trainer-v2"]
            started = time.monotonic()
            self.apply_crd_files([testbin.jobset_crd(), *testbin.trainer_v2_crds()])
            self.create("/api/v1/namespaces", {"metadata": {"name": TRAINING_OPERATOR_NAMESPACE}})
            base = self.workdir / "trainer-v2"
            ca = pki.CertificateAuthority(base / "pki", "ftj-trainer-v2-ca")
            jobset_port, trainer_port = free_port(), free_port()
            self._start_v2_component(
                "jobset",
                testbin.binary("jobset"),
                base / "jobset",
                ca,
                lambda probe, certs: {
                    "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
                    "kind": "Configuration",
                    "internalCertManagement": {"enable": False},
                    "webhook": {"port": jobset_port, "host": "127.0.0.1", "certDir": str(certs)},
                    "metrics": {"bindAddress": "0"},
                    "health": {"healthProbeBindAddress": f"127.0.0.1:{probe}"},
                    "leaderElection": {"leaderElect": False},
                },
            )
            trainer = self._start_v2_component(
                "trainer-v2",
                testbin.binary("trainer-v2", "trainer-controller-manager"),
                base / "trainer",
                ca,
                lambda probe, certs: {
                    "apiVersion": "config.trainer.kubeflow.org/v1alpha1",
                    "kind": "Configuration",
                    "certManagement": {"enable": False},
                    "webhook": {"port": trainer_port, "host": "127.0.0.1"},
                    "metrics": {"bindAddress": "0"},
                    "health": {"healthProbeBindAddress": f"127.0.0.1:{probe}"},
                    "leaderElection": {"leaderElect": False},
                },
            )
            # Their defaulting lives in mutating webhooks (a JobSet without it has no spec.network and its controller
            # panics), so unlike the v1 operator's, these are registered, pointing at the local servers.
            self._register_webhooks("jobset", testbin.jobset_webhooks(), jobset_port, ca.cert_path)
            self._register_webhooks("trainer-v2", testbin.trainer_v2_webhooks(), trainer_port, ca.cert_path)
            self.timings["trainer-v2"] = time.monotonic() - started
            return trainer

    def _register_webhooks(self, owner: str, manifest: Path, port: int, ca_cert: Path) -> None:
        """The upstream webhook configurations, each webhook called at https://127.0.0.1:<port><path>. Pod webhooks
        (JobSet's) see only Pods of a JobSet, so the other tests' Pods never depend on these servers."""
        bundle = b64encode(ca_cert.read_bytes()).decode()
        for document in yaml.safe_load_all(manifest.read_text()):
            if not isinstance(document, dict) or not document.get("kind", "").endswith("WebhookConfiguration"):
                continue
            kind = document["kind"]
            plural = (
                "mutatingwebhookconfigurations" if kind.startswith("Mutating") else "validatingwebhookconfigurations"
            )
            document["metadata"] = {"name": f"{owner}-{document['metadata']['name']}"}
            for webhook in document["webhooks"]:
                path = webhook["clientConfig"]["service"]["path"]
                webhook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}
                if any("pods" in rule.get("resources", []) for rule in webhook.get("rules", [])):
                    webhook["objectSelector"] = {
                        "matchExpressions": [{"key": "jobset.sigs.k8s.io/jobset-name", "operator": "Exists"}]
                    }
            self.create(f"/apis/admissionregistration.k8s.io/v1/{plural}", document)

    def _start_v2_component(
        self, name: str, binary: Path, base: Path, ca: pki.CertificateAuthority, configuration: Any
    ) -> ManagedProcess:
        """One controller-runtime manager of the Trainer v2 stack, with its Configuration file and serving certs."""
        tmpdir = base / "tmp"
        certs = tmpdir / "k8s-webhook-server" / "serving-certs"
        certs.mkdir(parents=True)
        serving = ca.issue(
            f"{name}-webhook", "localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",), server=True
        )
        for target, source in (("tls.crt", serving.cert), ("tls.key", serving.key)):
            shutil.copyfile(source, certs / target)
        probe = free_port()
        config_file = base / "config.yaml"
        config_file.write_text(yaml.safe_dump(configuration(probe, certs)))
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "TMPDIR": str(tmpdir)}
        proc = self._spawn(name, [binary, f"--config={config_file}", "--zap-log-level=info"], env=env)
        wait_until(
            lambda: _ok(f"http://127.0.0.1:{probe}/readyz"),
            timeout=START_TIMEOUT,
            what=f"{name} /readyz",
            watch=[proc],
        )
        return proc

    def _prepare_webhook_certs(self) -> Path:
        """Give the training operator its webhook certificates before it starts; return its private TMPDIR.

        In a cluster, the operator's certificate rotator fills its Secret and the kubelet mounts the Secret
        where the webhook server reads it. Here the test does both parts up front, with certificates the rotator
        accepts as valid (so it never rotates them): the Secret holds them and the webhook server reads a copy
        in a directory private to this control plane. Only the rotator's "are the certificates mounted" check
        looks at the fixed WEBHOOK_CERT_DIR, and only for a file's existence; that directory is shared with
        other sessions on the machine, so nothing there is ever replaced (a replaced pair could be read half old,
        half new).
        """
        base = self.workdir / "training-operator"
        ca = pki.CertificateAuthority(
            base / "pki",
            WEBHOOK_CA_NAME,
            dns_names=(WEBHOOK_CA_NAME,),
            validity=WEBHOOK_CERT_VALIDITY,
            rsa_key=True,  # the rotator parses its CA key as PKCS#1 RSA
        )
        serving = ca.issue("tls", WEBHOOK_DNS_NAME, dns_names=(WEBHOOK_DNS_NAME,), server=True)
        files = {"ca.crt": ca.cert_path, "ca.key": ca.key_path, "tls.crt": serving.cert, "tls.key": serving.key}
        self.create(
            f"/api/v1/namespaces/{TRAINING_OPERATOR_NAMESPACE}/secrets",
            {
                "metadata": {"name": WEBHOOK_SECRET},
                "data": {name: b64encode(path.read_bytes()).decode() for name, path in files.items()},
            },
        )
        tmpdir = base / "tmp"
        certs = tmpdir / "k8s-webhook-server" / "serving-certs"
        certs.mkdir(parents=True)
        for name in ("tls.crt", "tls.key"):
            shutil.copyfile(files[name], certs / name)
            (certs / name).chmod(0o600)
        WEBHOOK_CERT_DIR.mkdir(parents=True, exist_ok=True)
        (WEBHOOK_CERT_DIR / "tls.crt").touch()  # the rotator only stats it; an existing file keeps its content
        return tmpdir


def main(argv: list[str] | None = None) -> int:
    """Start a control plane, print its start-up times and kubeconfig; with --hold, keep it up until Ctrl-C.

    Usage (from tests/): ``python -m support.controlplane [--workloads] [--training-operator] [--hold]``
    """
    import argparse
    import signal
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m support.controlplane", description=main.__doc__)
    parser.add_argument("--workloads", action="store_true", help="also start controller manager, scheduler, kwok")
    parser.add_argument("--training-operator", action="store_true", help="also start the training operator")
    parser.add_argument("--hold", action="store_true", help="keep running until interrupted")
    args = parser.parse_args(argv)
    started = time.monotonic()
    plane = ControlPlane.start(Path(tempfile.mkdtemp(prefix="ftj-controlplane-")))
    try:
        print(f"control plane ready in {time.monotonic() - started:.1f}s")
        if args.workloads or args.training_operator:
            plane.ensure_controller_manager()
            plane.ensure_scheduler()
            plane.ensure_kwok()
        if args.training_operator:
            plane.ensure_training_operator()
        for name, seconds in plane.timings.items():
            print(f"  {name}: {seconds:.2f}s")
        print(f"KUBECONFIG={plane.kubeconfig}")
        if args.hold:
            print("holding; Ctrl-C to stop")
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        plane.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
