"""lmjax.parallel.distributed: rendezvous choice, hints, and real 2-process runs over gloo."""

import subprocess

from lmjax.parallel import distributed
from tests.helpers import WORKER_SCRIPT, clean_env, free_port
from tests.unit.test_distributed import PY


def test_two_processes_agree_on_a_global_sum(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [PY, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(
                LMJAX_COORDINATOR=coordinator,
                LMJAX_NUM_PROCESSES="2",
                LMJAX_PROCESS_ID=str(i),
                LMJAX_LOCAL_DEVICES="3",
            ),
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    expected = float(sum(range(1, 7)))  # 2 processes x 3 devices hold 1..6
    for i, (out, err) in enumerate(outputs):
        result = next(line.split() for line in out.splitlines() if line.startswith("RESULT"))
        assert result[1:5] == [str(i), "2", "3", "6"]
        assert float(result[5]) == expected and float(result[6]) == expected
        assert result[7] == str(i == 0)
        assert (
            f"lmjax.parallel.distributed: process {i}/2 (explicit start, coordinator {coordinator}): "
            f"3 local cpu devices, 6 global"
        ) in err


def test_missing_peer_fails_with_a_hint_within_the_timeout():
    """Process 0 alone and process 1 alone (different ports) both give up after 6 s."""
    ports = [free_port(), free_port()]
    code = "from lmjax.parallel import distributed; distributed.initialize(); print('JOINED')"
    procs = [
        subprocess.Popen(
            [PY, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(
                LMJAX_COORDINATOR=f"127.0.0.1:{port}",
                LMJAX_NUM_PROCESSES="2",
                LMJAX_PROCESS_ID=str(i),
                LMJAX_INIT_TIMEOUT="6",
            ),
        )
        for i, port in enumerate(ports)
    ]
    (out0, err0), (out1, err1) = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [distributed.RENDEZVOUS_TIMEOUT_EXIT] * 2
    assert "JOINED" not in out0 + out1
    assert "within 6 s" in err0 and f"hosting the coordinator at 127.0.0.1:{ports[0]}" in err0
    assert f"nothing answers at 127.0.0.1:{ports[1]}" in err1
    assert "LMJAX_NUM_PROCESSES=2" in err1
