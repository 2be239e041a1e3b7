"""The Ray reward pool: same results as the in-process service, light actors, dead workers replaced."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import rewards.registry
from tracerl.reward_service import RewardError, RewardService, RewardSpec

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

REWARD_FILE = """
import time

def slow_echo(prompts, completions, **kwargs):
    time.sleep(0.5)
    return [float(c) for c in completions]

def fails_on_c5(prompts, completions, **kwargs):
    if "c5" in completions:
        raise ValueError("c5 is unscorable")
    return [1.0] * len(completions)

def hangs_on_h(prompts, completions, **kwargs):
    if "h" in completions:
        time.sleep(120)
    return [1.0] * len(completions)

def plants_key(prompts, completions, **kwargs):
    # adds a key to this worker's session keyring and reads it back (x86_64 system-call numbers)
    import ctypes
    libc, L = ctypes.CDLL(None, use_errno=True), ctypes.c_long
    if completions[0].startswith("tracerl-pool-bait"):
        libc.syscall(L(248), b"user", completions[0].encode(), b"pool-secret", L(11), L(-3))  # add_key
    serial = libc.syscall(L(249), b"user", completions[0].encode(), None, L(0))  # request_key
    return [float(serial > 0)] * len(completions)
"""


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "pool_rewards.py"
    path.write_text(REWARD_FILE)
    return path


def test_pool_matches_the_service_and_actors_do_not_import_torch(ray_local) -> None:
    from tracerl.workers import RewardPool

    specs = [RewardSpec("gsm8k"), RewardSpec("code", weight=0.5)]
    completions = [f"#### {i}\n```python\ndef f():\n    return {i % 2}\n```" for i in range(7)]
    columns = {"answer": [str(i % 3) for i in range(7)], "tests": [["assert f() == 1"]] * 7}
    pool = RewardPool(specs, num_workers=2)
    try:
        refs = pool.score_async(["q"] * 7, completions, columns=columns)
        assert len(refs) == 2 and all(isinstance(r, ray.ObjectRef) for r in refs)  # the driver is not blocked
        result = pool.gather(refs)
        expected = RewardService(specs).score(["q"] * 7, completions, columns=columns)
        assert result.parts == expected.parts and result.total == expected.total
        assert result.metrics == expected.metrics  # means over the whole batch, not averaged shard means
        # gsm8k: i == i % 3 for i = 0, 1, 2;  code: f() == 1 for odd i
        assert result.total == [0.0 + 1.0 * (i < 3) + 0.5 * (i % 2) for i in range(7)]
        infos = ray.get([w.info.remote() for w in pool.workers])
        assert [info["torch_imported"] for info in infos] == [False, False]
    finally:
        pool.shutdown()


def test_a_killed_worker_is_replaced_and_its_shard_redone(ray_local, reward_file: Path) -> None:
    from tracerl.workers import RewardPool

    pool = RewardPool([f"{reward_file}:slow_echo"], num_workers=2)
    try:
        refs = pool.score_async(["q"] * 4, ["0", "1", "2", "3"])
        victim = pool.workers[1]
        ray.kill(victim)  # dies while scoring samples 2..3
        result = pool.gather(refs)
        assert result.total == [0.0, 1.0, 2.0, 3.0]  # nothing lost, order kept
        assert pool.restarts == 1 and pool.workers[1] is not victim
        assert pool.score(["q"], ["7"]).total == [7.0]  # the replacement works
    finally:
        pool.shutdown()


def test_errors_from_a_worker_name_the_sample_in_the_whole_batch(ray_local, reward_file: Path) -> None:
    from tracerl.workers import RewardPool

    completions = [f"c{i}" for i in range(6)]
    pool = RewardPool([f"{reward_file}:fails_on_c5"], num_workers=2)
    try:
        with pytest.raises(RewardError) as err:
            pool.score(["q"] * 6, completions)  # c5 is the third sample of the second shard
        assert str(err.value).startswith("reward function 'fails_on_c5' failed on sample 5: ValueError")
        assert "(completion 5: 'c5')" in str(err.value)  # the quote uses the batch index too, not the shard's 2
    finally:
        pool.shutdown()
    nan_pool = RewardPool([f"{reward_file}:fails_on_c5"], num_workers=2, on_error="nan")
    try:
        result = nan_pool.score(["q"] * 6, completions)
        assert result.total[:3] == [1.0, 1.0, 1.0] and result.metrics["reward/errors/fails_on_c5"] == 3.0
    finally:
        nan_pool.shutdown()


USER_MODULE = """
import rewards

@rewards.register_reward("user_length_via_imports")
def user_length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]
"""


def test_a_reward_registered_in_a_user_module_scores_in_two_workers(
    ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracerl.workers import RewardPool

    monkeypatch.setattr(rewards.registry, "REWARDS", dict(rewards.registry.REWARDS))  # undone after the test
    (tmp_path / "user_rewards_mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # importable in the driver only; the workers learn where
    pool = RewardPool(["user_length_via_imports"], num_workers=2, imports=["user_rewards_mod"])
    try:
        result = pool.score(["q"] * 4, ["a", "bb", "ccc", "dddd"])
        assert result.total == [1.0, 2.0, 3.0, 4.0]
        assert len(set(ray.get([w.ready.remote() for w in pool.workers]))) == 2  # two processes scored
        assert pool.restarts == 0
    finally:
        pool.shutdown()


def test_a_worker_that_cannot_start_reports_its_own_error_at_once(ray_local, tmp_path: Path, monkeypatch) -> None:
    from tracerl.workers import RewardPool

    monkeypatch.setattr(rewards.registry, "REWARDS", dict(rewards.registry.REWARDS))
    (tmp_path / "driver_only_mod.py").write_text(USER_MODULE.replace("user_length_via_imports", "driver_only"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import driver_only_mod  # noqa: F401 - registered in the driver, but not listed in imports

    with pytest.raises(RewardError) as err:
        RewardPool(["driver_only"], num_workers=2)
    message = str(err.value)
    assert message.startswith("a reward worker could not start: unknown reward 'driver_only'")
    assert "died" not in message
    with pytest.raises(RewardError, match="could not import module 'no_such_module_xyz' listed in reward.imports"):
        RewardPool(["length"], num_workers=1, imports=["no_such_module_xyz"])


ESCAPES = [
    "import os\ndef f():\n    return 'test_reward_pool.py' in os.listdir({tests!r})",  # the driver's folder
    "def f():\n    return len(open({bait!r}).read()) > 0",  # a file in a folder on the driver's sys.path
    "import os\ndef f():\n    return any(n.startswith('ray-') for n in os.listdir('/tmp'))",  # Ray's sockets
    "import os\ndef f():\n    return os.listdir('.') == ['main.py']",  # control: an ordinary program
]


def test_sandboxed_code_in_ray_workers_sees_no_host_folders(ray_local, tmp_path: Path, monkeypatch) -> None:
    from rewards.sandbox import isolation
    from tracerl.workers import RewardPool

    if not isolation().filesystem:
        pytest.skip(f"no filesystem isolation here ({isolation().notes})")
    bait = tmp_path / "id_rsa"
    bait.write_text("fake key")
    monkeypatch.syspath_prepend(str(tmp_path))
    programs = [e.format(tests=str(Path(__file__).parent), bait=str(bait)) for e in ESCAPES]
    assert Path(__file__).name in os.listdir(Path(__file__).parent)  # each escape is real on the host
    pool = RewardPool([RewardSpec("code", kwargs={"cpu_s": 1.0, "wall_s": 4.0})], num_workers=2)
    try:
        result = pool.score(["q"] * 4, programs, columns={"tests": [["assert f()"]] * 4})
    finally:
        pool.shutdown()
    assert result.total == [0.0, 0.0, 0.0, 1.0]


def test_a_worker_whose_call_timed_out_is_replaced_with_on_error_nan(ray_local, reward_file: Path) -> None:
    from tracerl.workers import RewardPool

    pool = RewardPool([RewardSpec(f"{reward_file}:hangs_on_h")], num_workers=1, on_error="nan", timeout_s=1.0)
    try:
        stuck = pool.workers[0]
        result = pool.score(["q"] * 2, ["h", "x"])
        assert all(v != v for v in result.total) and result.metrics["reward/errors/hangs_on_h"] == 2.0
        assert pool.restarts == 1 and pool.workers[0] is not stuck  # its sleeping call would hold a core for 2 min
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(stuck.info.remote(), timeout=30)
        assert pool.score(["q"], ["x"]).total == [1.0]  # the replacement scores at once
        assert pool.restarts == 1
    finally:
        pool.shutdown()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the bait uses x86_64 keyring system-call numbers")
def test_sandboxed_code_in_ray_workers_cannot_read_the_session_keyring(ray_local, reward_file: Path) -> None:
    from rewards.sandbox import isolation
    from tracerl.workers import RewardPool

    if not isolation().syscall_filter:
        pytest.skip(f"no system-call filter here ({isolation().notes})")
    description = f"tracerl-pool-bait-{os.getpid()}"
    program = (
        "import ctypes\nlibc, L = ctypes.CDLL(None, use_errno=True), ctypes.c_long\ndef f():\n"
        f"    return libc.syscall(L(249), b'user', {description.encode()!r}, None, L(0)) > 0"
    )
    specs = [RewardSpec(f"{reward_file}:plants_key"), RewardSpec("code", kwargs={"wall_s": 4.0})]
    pool = RewardPool(specs, num_workers=1)
    try:
        planted = pool.score(["q"], [description], columns={"tests": [["assert True"]]})
        sandboxed = pool.score(["q"], [program], columns={"tests": [["assert f()"]]})
    finally:
        pool.shutdown()
    assert planted.parts["plants_key"] == [1.0]  # the worker process itself holds and reads the key
    assert sandboxed.parts["code"] == [0.0]  # a program it runs in the sandbox does not
