#!/usr/bin/env python3
"""Offline checks of terraform/ (the Terraform registry is unreachable here, so no `terraform
init/validate`): every .tf parses (python-hcl2); checkov passes with zero failed checks and every
skip carries its reason; the IAM policies grant exactly the AWS actions the code calls (the EC2
provider's SDK calls, the store's S3 operations, the coordinators' boot script) and no wildcard
action; every flag of the rendered `flotilla coordinator` / `flotilla worker` command lines is one
the binary accepts.

    scripts/terraform_check.py FLOTILLA_BINARY      (scripts/test.sh runs it in its venv)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import hcl2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF = os.path.join(ROOT, "terraform")
failures = []


def fail(message):
    failures.append(message)
    print("FAIL:", message)


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


# 1. Every .tf parses.
parsed = {}
for path in sorted(glob.glob(os.path.join(TF, "*.tf"))):
    with open(path) as f:
        try:
            parsed[os.path.basename(path)] = hcl2.load(f)
        except Exception as e:  # noqa: BLE001 - the parser's own error types vary
            fail(f"{path} does not parse: {e}")
print(f"parsed {len(parsed)} .tf files")

# 2. checkov: zero failed checks; each inline skip says why. Run without network (a new network
#    namespace when root) and without Prisma Cloud downloads.
for path in glob.glob(os.path.join(TF, "*.tf")):
    for line in open(path):
        if "checkov:skip=" in line and not re.search(r"checkov:skip=CKV\w*_\d+:\s*\S", line):
            fail(f"{os.path.basename(path)}: a checkov skip without a reason: {line.strip()}")
checkov = [os.path.join(os.path.dirname(sys.executable), "checkov"), "-d", TF, "--framework", "terraform",
           "--compact", "--quiet", "--skip-download"]
if os.geteuid() == 0 and shutil.which("unshare"):
    checkov = ["unshare", "-n"] + checkov
out = subprocess.run(checkov, capture_output=True, text=True)
summary = re.search(r"Passed checks: (\d+), Failed checks: (\d+), Skipped checks: (\d+)", out.stdout)
if not summary:
    fail(f"checkov printed no summary:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
else:
    passed, failed, skipped = map(int, summary.groups())
    print(f"checkov: {passed} passed, {failed} failed, {skipped} skipped (each with its reason inline)")
    if failed:
        fail("checkov failed checks:\n" + out.stdout[out.stdout.find("Check:"):])


# 3. IAM: exactly the actions the code calls.
def flatten(value):
    """python-hcl2 wraps attribute values in lists (older versions) or not (newer)."""
    if isinstance(value, list):
        return [item for v in value for item in flatten(v)]
    return [value]


def policy_actions(name):
    for block in parsed["iam.tf"].get("data", []):
        for kind, docs in block.items():
            if kind == "aws_iam_policy_document" and name in docs:
                statements = docs[name].get("statement", [])
                return {a for s in statements for a in flatten(s.get("actions", []))}
    fail(f"no aws_iam_policy_document.{name} in iam.tf")
    return set()


def camel(snake):
    return "".join(word.capitalize() for word in snake.split("_"))


ec2_source = read("coordinator", "ec2", "src", "lib.rs")
ec2_calls = {f"ec2:{camel(m)}" for m in re.findall(r"client\s*\.\s*([a-z_]+)\(\)", ec2_source)}
# Launching a fleet from a template runs instances, tags them on creation and passes the
# template's instance profile (the worker role): implied by CreateFleet.
if "ec2:CreateFleet" in ec2_calls:
    ec2_calls |= {"ec2:RunInstances", "ec2:CreateTags", "iam:PassRole"}

# Every ObjectStore method; the ones the code calls must each map to their S3 actions.
OBJECT_STORE_METHODS = {"put", "put_opts", "put_multipart", "put_multipart_opts", "get", "get_opts", "get_range",
                        "get_ranges", "head", "delete", "delete_stream", "list", "list_with_offset",
                        "list_with_delimiter", "copy", "rename", "copy_if_not_exists", "rename_if_not_exists"}
S3_OF = {"put": {"s3:PutObject"}, "get": {"s3:GetObject"}, "get_range": {"s3:GetObject"}, "head": {"s3:GetObject"},
         "delete": {"s3:DeleteObject"}, "list": {"s3:ListBucket"}, "list_with_delimiter": {"s3:ListBucket"},
         "copy": {"s3:GetObject", "s3:PutObject"}}
store_calls = set()
for path in glob.glob(os.path.join(ROOT, "store", "src", "**", "*.rs"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "coordinator", "src", "**", "*.rs"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "worker", "src", "**", "*.rs"), recursive=True):
    for op in re.findall(r"\.store(?:\(\))?\s*\.\s*([a-z_]+)\(", open(path).read()):
        if op in S3_OF:
            store_calls |= S3_OF[op]
        elif op in OBJECT_STORE_METHODS:
            fail(f"{os.path.relpath(path, ROOT)}: store operation `{op}` has no S3 action mapping here")
# The bucket is SSE-KMS: reading decrypts, writing generates a data key.
store_calls |= {"kms:Decrypt", "kms:GenerateDataKey"}

boot = read("terraform", "templates", "coordinator.sh.tftpl")
boot_calls = set()
if "aws ssm get-parameter" in boot:
    boot_calls.add("ssm:GetParameter")

for name, expected in [("coordinator_provider", ec2_calls), ("store", store_calls), ("coordinator_boot", boot_calls)]:
    granted = policy_actions(name)
    wildcard = {a for a in granted if "*" in a}
    if wildcard:
        fail(f"{name}: wildcard actions {sorted(wildcard)}")
    if granted - expected:
        fail(f"{name}: grants actions the code never calls: {sorted(granted - expected)}")
    if expected - granted:
        fail(f"{name}: misses actions the code calls: {sorted(expected - granted)}")
    print(f"IAM {name}: exactly {len(expected)} actions: {', '.join(sorted(expected))}")

# 4. The module and the EC2 provider agree: the launch template's name, the cluster tag.
template_rust = re.search(r'fn template_name[^{]*\{\s*format!\("([^"]*)\{\}"', ec2_source)
cluster_tag = re.search(r'pub const CLUSTER_TAG: &str = "([^"]+)"', read("coordinator", "src", "provider", "mod.rs"))
workers_tf = read("terraform", "workers.tf")
if not template_rust or f'name                   = "{template_rust.group(1)}${{var.cluster_id}}"' not in workers_tf:
    fail("the launch template name in terraform/workers.tf is not the one the EC2 provider looks up")
if not cluster_tag or f'"{cluster_tag.group(1)}" = var.cluster_id' not in workers_tf:
    fail("terraform/workers.tf does not tag instances with the provider's cluster tag")
print("the module's launch template and tags are the ones the EC2 provider uses")

# 5. The rendered command lines use only flags the binary accepts.
binary = sys.argv[1] if len(sys.argv) > 1 else None
if binary:
    def flags_of(command):
        text = subprocess.run([binary, command, "--help"], capture_output=True, text=True, check=True).stdout
        return set(re.findall(r"(--[a-z0-9-]+)", text))
    # The ExecStart line, plus flags the module splices into it (`--ec2-subnet ZONE=SUBNET`).
    exec_line = re.search(r"ExecStart=\S+ coordinator (.*)", boot).group(1)
    exec_start = exec_line + " " + " ".join(re.findall(r"(--[a-z0-9-]+) ", read("terraform", "coordinators.tf")))
    worker_line = re.search(r"exec flotilla worker (.*)", read("terraform", "templates", "worker.sh.tftpl")).group(1)
    for command, line in [("coordinator", exec_start), ("worker", worker_line)]:
        used = set(re.findall(r"(--[a-z0-9-]+)", line))
        unknown = used - flags_of(command)
        if unknown:
            fail(f"`flotilla {command}` does not accept {sorted(unknown)} (rendered by terraform/templates)")
        print(f"flotilla {command}: the template's {len(used)} flags are all accepted")

    # 6. The rendered coordinator command line passes `flotilla coordinator --check-config`,
    #    with real certificates made by `flotilla certs` and a shipped price list.
    import shlex
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        certs = os.path.join(tmp, "tls")
        for args in (["init"], ["coordinator", "--name", "coordinator", "--host", "10.0.1.10"], ["worker"]):
            subprocess.run([binary, "certs", *args, "--dir", certs], check=True, capture_output=True)
        values = {"id": "1", "cluster_id": "check", "region": "us-east-1", "listen": "10.0.1.10:7100",
                  "metrics_listen": "10.0.1.10:9464",
                  "peers": "1=10.0.1.10:7100,2=10.0.2.10:7100,3=10.0.3.10:7100",
                  "raft_peers": "1=10.0.1.10:7101,2=10.0.2.10:7101,3=10.0.3.10:7101", "store_uri": "s3://bucket/cluster",
                  "worker_ami": "ami-0123", "worker_sg": "sg-0123", "max_instances": "16", "max_usd_per_hour": "20",
                  "worker_subnets": "--ec2-subnet us-east-1a=subnet-a --ec2-subnet us-east-1b=subnet-b"}
        line = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], exec_line)
        line = line.replace("/etc/flotilla/tls/", certs + "/").replace("/var/lib/flotilla", os.path.join(tmp, "data"))
        line = line.replace("/etc/flotilla/market.csv", sorted(glob.glob(os.path.join(ROOT, "examples", "traces", "*.csv")))[0])
        env = {"PATH": os.environ.get("PATH", ""), "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_ACCESS_KEY_ID": "check", "AWS_SECRET_ACCESS_KEY": "check"}
        env.update({f"FLOTILLA_{k}_TOKEN" if k else "FLOTILLA_TOKEN": f"{k or 'api'}-token-of-the-check-0123"
                    for k in ["", "SUBMIT", "READ", "JOIN", "PEER"]})
        out = subprocess.run([binary, "coordinator", *shlex.split(line), "--check-config"], capture_output=True,
                             text=True, env=env)
        if out.returncode != 0 or "configuration OK" not in out.stdout:
            fail(f"the rendered coordinator command line fails --check-config: {out.stderr.strip()}\n{line}")
        else:
            print("the rendered coordinator command line passes --check-config:", out.stdout.strip())
        # ... and the check is real: a peer token equal to the API token is refused.
        env["FLOTILLA_PEER_TOKEN"] = env["FLOTILLA_TOKEN"]
        out = subprocess.run([binary, "coordinator", *shlex.split(line), "--check-config"], capture_output=True,
                             text=True, env=env)
        if out.returncode == 0 or "same secret" not in out.stderr:
            fail(f"--check-config accepted a peer token equal to the API token: {out.stdout}{out.stderr}")
else:
    print("no flotilla binary given: command-line flags not checked")

if failures:
    sys.exit(f"{len(failures)} terraform check(s) failed")
print("terraform checks passed")
