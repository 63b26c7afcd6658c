"""The only door devices have: nginx, with TLS, forwarding the Fleet API alone.

Flower 1.42's SuperLink serves its Fleet, Control and Runtime APIs on one HTTP address
(`/v1/fleet/*`, `/v1/control/*`, the runtime routes); whoever reaches it with the CA
certificate could list runs, register node keys and submit runs. fedllm therefore binds
the SuperLink to loopback and puts a standard reverse proxy (nginx, from the OS
packages) on the device-facing address. nginx terminates TLS with the server's
certificate, forwards POSTs under `/v1/fleet/` to the SuperLink over TLS (verified with
the CA), and answers everything else 404. Node keys are registered by the operator only,
on the loopback Control API.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from fedllm.errors import FedllmError

FLEET_PREFIX = "/v1/fleet/"
MAX_BODY = "256m"  # one message's objects; an adapter delta of a 1B-parameter model at r=16 is ~20 MiB


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if Path(p).exists()), None)
    if not found:
        raise FedllmError("nginx is not installed: `fedllm server` exposes only the Fleet API through it "
                          "(Debian/Ubuntu: apt-get install nginx)")
    return found


def certificate_name(cert: Path) -> str | None:
    """A DNS name the server certificate is valid for: what nginx checks on the loopback hop
    (nginx matches DNS names only, not IP addresses); None when it names none."""
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    dns = names.get_values_for_type(x509.DNSName) if names is not None else []
    return str(dns[0]) if dns else None


def nginx_config(*, host: str, port: int, upstream_port: int, cert: Path, key: Path, ca_cert: Path,
                 work: Path) -> str:
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    temp = work / "tmp"
    name = certificate_name(cert)
    # The loopback hop: the SuperLink's certificate is verified against the CA, and its name when it has a DNS
    # one (nginx cannot match an IP address); the hop never leaves this machine.
    verify = (f"proxy_ssl_verify on;\n            proxy_ssl_trusted_certificate {Path(ca_cert).resolve()};\n"
              f"            proxy_ssl_name {name};\n            proxy_ssl_server_name on;") if name else \
        "proxy_ssl_verify off;"
    return f"""# Written by fedllm server: only the Fleet API faces the network.
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {work}/nginx-access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server_tokens off;
    client_max_body_size {MAX_BODY};
    server {{
        listen {listen} ssl;
        ssl_certificate {Path(cert).resolve()};
        ssl_certificate_key {Path(key).resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;
        location {FLEET_PREFIX} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            {verify}
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
        location / {{ return 404; }}
    }}
}}
"""


def start_proxy(*, host: str, port: int, upstream_port: int, cert: Path, key: Path, ca_cert: Path,
                work: Path) -> subprocess.Popen:
    """nginx in the foreground (its own process group), config and logs under `work`."""
    binary = nginx_binary()
    work = Path(work).resolve()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        (work / "tmp" / sub).chmod(0o777)  # nginx's workers drop privileges when started as root
    conf = work / "nginx.conf"
    conf.write_text(nginx_config(host=host, port=port, upstream_port=upstream_port, cert=cert, key=key,
                                 ca_cert=ca_cert, work=work))
    test = subprocess.run([binary, "-t", "-p", str(work), "-c", str(conf)], capture_output=True, text=True)
    if test.returncode != 0:
        raise FedllmError(f"nginx refused its configuration {conf}:\n{test.stderr.strip()[-1500:]}")
    log = open(work / "nginx.log", "ab")
    return subprocess.Popen([binary, "-p", str(work), "-c", str(conf), "-g", "daemon off;"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def exposure(host: str, port: int, local_port: int) -> str:
    """What faces the network, for the operator."""
    reach = "every network interface" if host in ("0.0.0.0", "::") else f"{host} only"
    return (f"network-facing: {host}:{port} ({reach}), TLS by nginx: the Fleet API only (POST {FLEET_PREFIX}*)\n"
            f"loopback only: 127.0.0.1:{local_port}: the SuperLink's Control API (runs, node keys) and Runtime API")
