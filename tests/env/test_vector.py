"""VectorVideoEnv steps many episodes at once; SerialVectorEnv gives the same results."""

from env import SerialVectorEnv, VectorVideoEnv
from env.testing import call


def _run(venv, tasks):
    ids = [f"ep{i}" for i in range(len(tasks))]
    resets = venv.reset_batch(list(zip(ids, tasks)))
    steps = venv.step_batch([(i, call("temporal_zoom", start=1.0, end=6.0, num_frames=4)) for i in ids])
    answers = venv.step_batch([(i, "<answer>A</answer>") for i in ids])
    return resets, steps, answers


def test_vector_matches_serial(demo_tasks):
    tasks = demo_tasks * 2
    vec, ser = _run(VectorVideoEnv(threads=4), tasks), _run(SerialVectorEnv(), tasks)
    for (o1, _), (o2, _) in zip(vec[0], ser[0]):
        assert o1.text == o2.text and [f.ref for f in o1.frames] == [f.ref for f in o2.frames]
    for a, b in zip(vec[1] + vec[2], ser[1] + ser[2]):
        assert a[0].text == b[0].text and a[1:4] == b[1:4]


def test_finished_episodes_are_closed_and_unknown_ids_do_not_raise(demo_tasks):
    venv = VectorVideoEnv(threads=2)
    _run(venv, demo_tasks[:2])
    assert venv.stats()["open_episodes"] == 0
    obs, r, term, trunc, info = venv.step("nope", "<answer>A</answer>")
    assert term and "no episode" in obs.text


def test_prefetch_warms_the_overview_and_swallows_errors(demo_tasks, tmp_path):
    from configs import EnvConfig

    venv = VectorVideoEnv(EnvConfig(overview_size=[144, 81]), threads=2)  # a size no other test decodes
    venv.prefetch(demo_tasks[4])
    before = venv.decoder.stats()
    obs, info = venv.reset("p", demo_tasks[4])
    after = venv.decoder.stats()
    assert len(obs.frames) > 0 and after["misses"] == before["misses"]  # every overview frame was cached
    broken = type(demo_tasks[0])(**{**demo_tasks[0].__dict__, "id": "gone", "video": str(tmp_path / "gone.mp4")})
    venv.prefetch(broken)  # a hint: no exception; the real reset reports the error
    assert venv.reset("q", broken)[1]["status"] == "FAILED"
