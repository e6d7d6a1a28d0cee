"""Results shared through a DVC remote (docs/sharing.md): the quick start's outputs pushed, with the run-cache,
to a local folder (a lab's shared disk) and over SSH to a real sshd on 127.0.0.1, pulled into a fresh clone
that is then up to date, reruns nothing and predicts bit for bit the same; and an experiment carried from
one clone to another through a bare git `origin` and the DVC remote.

Nothing runs the pipeline again: the projects are copies of the session's `reproduced` (the README quick
start) and `trained_project` fixtures whose large files are hard links, so the fixtures stay as they are."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import dvc, run

SSHD = Path("/usr/sbin/sshd")
LINK_AT = 1 << 20  # files this large are hard-linked, smaller ones copied


def link_copy(src: Path, dst: Path) -> Path:
    """A copy of project `src` in `dst`, its large files (checkpoints, DVC cache objects) hard links.
    Git and DVC replace such files by a new file and a rename, never by writing into them, so `src` stays
    as it is. DVC's own state (.dvc/tmp: locks and databases written in place) is copied, not linked."""
    def copy(s: str, d: str) -> str:
        if os.path.getsize(s) >= LINK_AT and "/.dvc/tmp/" not in s:
            try:
                os.link(s, d)
                return d
            except OSError:  # another file system: copy
                pass
        return shutil.copy2(s, d)

    shutil.copytree(src, dst, symlinks=True, copy_function=copy)
    return dst


def commit_all(project: Path, message: str) -> None:
    """What a user commits after a run: dvc.lock, params, metrics and reports; DVC's outputs are git-ignored."""
    run(["git", "add", "-A"], cwd=project)
    run(["git", "commit", "-qm", message], cwd=project)


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def predictions(project: Path, variant: str, images: Path, out: Path, monkeypatch) -> list[dict]:
    """The prediction command (`cxr-predict --variant`, in this process: no second torch start) in
    `project`, as its JSON rows. JSON keeps every bit of a float32's value."""
    from cxrlab.cli import predict

    with monkeypatch.context() as m:
        m.chdir(project)
        predict.main(["--variant", variant, str(images), "--out", str(out)])
    return json.loads(out.read_text())["predictions"]


def transfer(project: Path, *args: str, env: dict | None = None) -> float:
    """`dvc <args>` in `project`; its duration in seconds."""
    started = time.perf_counter()
    run([sys.executable, "-m", "dvc", *args], cwd=project, extra_env=env)
    return time.perf_counter() - started


def pull_and_check(lab: Path, colleague: Path, monkeypatch, targets: tuple[str, ...] = (),
                   env: dict | None = None) -> float:
    """In a fresh clone of `lab`: `dvc pull --run-cache`, then it is up to date, `dvc repro` runs nothing
    and the baseline predicts bit for bit as in `lab`. `targets`: the stages that ran (all when empty).
    Returns the pull's duration."""
    assert not (colleague / "models/baseline").exists()  # only git's files so far
    with_deps = ("--with-deps", *targets) if targets else ()
    pull_s = transfer(colleague, "pull", "--run-cache", *with_deps, env=env)
    assert "Data and pipelines are up to date" in dvc("status", *targets, cwd=colleague).stdout
    repro = dvc("repro", *targets, cwd=colleague).stdout
    assert not ran_stages(repro), repro
    images = lab / "data" / "dataset" / "test"
    theirs = predictions(colleague, "baseline", images, colleague.parent / "theirs.json", monkeypatch)
    assert theirs == predictions(lab, "baseline", images, lab.parent / "ours.json", monkeypatch)
    return pull_s


@pytest.fixture(scope="module")
def shared(reproduced, tmp_path_factory) -> dict:
    """The lab's machine: a copy of the quick start's project, committed with a folder as its default DVC
    remote (in git: .dvc/config), pushed to a bare git `origin` and, with the run-cache, to the remote."""
    project, _ = reproduced
    root = tmp_path_factory.mktemp("shared")
    lab = link_copy(project, root / "lab")
    remote = root / "shared-disk" / "dvc"
    dvc("remote", "add", "-d", "shared", str(remote), cwd=lab)
    commit_all(lab, "results")
    run(["git", "init", "-q", "--bare", "origin.git"], cwd=root)
    run(["git", "remote", "set-url", "origin", str(root / "origin.git")], cwd=lab)  # a clone: it has one
    run(["git", "push", "-q", "origin", "HEAD:main"], cwd=lab)
    push_s = transfer(lab, "push", "--run-cache")
    return {"root": root, "lab": lab, "remote": remote, "origin": root / "origin.git", "push_s": push_s}


def test_a_colleague_pulls_the_quick_start_from_a_shared_folder_and_reruns_nothing(shared, tmp_path,
                                                                                  monkeypatch):
    lab, remote = shared["lab"], shared["remote"]
    started = time.perf_counter()
    run(["git", "clone", "-q", "-b", "main", str(shared["origin"]), "colleague"], cwd=tmp_path)
    colleague = tmp_path / "colleague"
    pull_s = pull_and_check(lab, colleague, monkeypatch)
    pushed = sum(f.stat().st_size for f in remote.rglob("*") if f.is_file())
    print(f"pushed {pushed / 1e6:.0f} MB in {shared['push_s']:.1f} s; pulled in {pull_s:.1f} s; clone, pull "
          f"and checks {time.perf_counter() - started:.1f} s")
    assert pushed >= (lab / "models/baseline/seed_42/best.pt").stat().st_size * 10  # 5 variants x 2
    assert any((remote / "runs").rglob("*")), "the run-cache was not pushed"

    # Without dvc.lock (say, params.yaml checked out from an older commit), the run-cache restores the
    # training run instead of training: it came from the remote, not from a run here.
    (colleague / "dvc.lock").unlink()
    log = dvc("repro", "train@baseline", cwd=colleague).stdout
    assert "Stage 'train@baseline' is cached - skipping run, checking out outputs" in log, log
    assert "train@baseline" not in ran_stages(log)
    assert (colleague / "models/baseline/seed_42/best.pt").read_bytes() == \
        (lab / "models/baseline/seed_42/best.pt").read_bytes()


def test_an_experiment_travels_between_clones_through_origin_and_the_remote(shared, tmp_path):
    """`dvc exp push origin` on one machine (the lab), `dvc exp pull origin` + `dvc exp apply` on another:
    the experiment's params come through git, its outputs through the DVC remote."""
    lab = shared["lab"]
    # something cheap: another ONNX opset reruns only the export of one variant
    log = dvc("exp", "run", "-n", "opset18", "export@baseline", "-S", "export.opset=18", cwd=lab).stdout
    assert ran_stages(log) == {"export@baseline"}, log
    dvc("exp", "push", "origin", "opset18", cwd=lab)  # the git refs to origin, the outputs to the DVC remote

    run(["git", "clone", "-q", "-b", "main", str(shared["origin"]), "laptop"], cwd=tmp_path)
    laptop = tmp_path / "laptop"
    dvc("exp", "pull", "origin", "opset18", cwd=laptop)
    assert "opset18" in dvc("exp", "list", "--name-only", cwd=laptop).stdout
    dvc("exp", "apply", "opset18", cwd=laptop)
    assert json.loads((laptop / "exports/baseline/seed_42.json").read_text())["opset"] == 18
    exported = laptop / "exports/baseline/seed_42.onnx"
    assert exported.read_bytes() == (lab / "exports/baseline/seed_42.onnx").read_bytes()
    assert "export:\n  opset: 18" in (laptop / "params.yaml").read_text()
    # the experiment's stage (the other variants' exports would follow its opset on their next run)
    assert "Data and pipelines are up to date" in dvc("status", "export@baseline", cwd=laptop).stdout


# ------------------------------------------------------------------ SSH
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path):
    """A real OpenSSH server on 127.0.0.1, for the current user, with a throwaway host key and user key
    (root logins allowed in this throwaway configuration only: CI runs as root); stopped afterwards.
    Yields (port, user, the user's private key, the server's public host key)."""
    if not SSHD.is_file() or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH's server is not installed (apt-get install openssh-server; .ci/run does)")
    folder = tmp_path / "sshd"
    folder.mkdir(mode=0o700)
    for name in ("host_key", "user_key"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], cwd=folder)
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    (folder / "authorized_keys").chmod(0o600)
    port, user = free_port(), getpass.getuser()
    config = folder / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {folder / 'host_key'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}", f"PidFile {folder / 'sshd.pid'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        f"PermitRootLogin {'prohibit-password' if user == 'root' else 'no'}", "UsePAM no",
        "StrictModes no",  # the key files live in pytest's temporary folders
        "Subsystem sftp internal-sftp", ""]))
    command = [str(SSHD), "-D", "-e", "-f", str(config)]  # -D: in the foreground (stopped below); -e: log to stderr
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir() and shutil.which("unshare"):
        # sshd run by root needs its privilege separation folder /run/sshd, which starting the system's ssh
        # service creates; a private mount namespace with an empty /run gives it one, the machine's untouched
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && exec "$@"', "sshd", *command]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            pytest.skip(f"sshd could not start: {proc.stderr.read().strip()[-500:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.skip("sshd did not listen on 127.0.0.1 within 10 s")
            time.sleep(0.1)
    try:
        yield port, user, folder / "user_key", (folder / "host_key.pub").read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_colleague_pulls_a_trained_model_over_ssh(sshd, trained_project, tmp_path, monkeypatch):
    """The baseline of `trained_project` (what its `dvc repro evaluate@baseline` made) through dvc-ssh:
    the URL goes in git, the key in each clone's local config (.dvc/config.local, git-ignored), the
    server's host key in a known_hosts of a HOME of its own (nothing of the user's ~/.ssh is read)."""
    pytest.importorskip("dvc_ssh", reason="dvc-ssh is not installed: pip install -e '.[remote]'")
    port, user, key, host_key = sshd
    store = tmp_path / "store"
    store.mkdir()
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key}")
    env, targets = {"HOME": str(home)}, ("evaluate@baseline",)

    lab = link_copy(trained_project, tmp_path / "lab")
    dvc("remote", "add", "-d", "lab", f"ssh://{user}@127.0.0.1:{port}{store}", cwd=lab)
    commit_all(lab, "results")
    dvc("remote", "modify", "--local", "lab", "keyfile", str(key), cwd=lab)
    push_s = transfer(lab, "push", "--run-cache", "--with-deps", *targets, env=env)
    assert any((store / "files").rglob("*")) and any((store / "runs").rglob("*"))

    run(["git", "clone", "-q", str(lab), "colleague"], cwd=tmp_path)
    colleague = tmp_path / "colleague"
    dvc("remote", "modify", "--local", "lab", "keyfile", str(key), cwd=colleague)
    pull_s = pull_and_check(lab, colleague, monkeypatch, targets, env)
    print(f"ssh: push {push_s:.1f} s, pull {pull_s:.1f} s")
