"""The `--nproc` launcher's stderr filter (train/common/launch.py): a rank's stderr reaches
the user as it comes, less the C++ runtime's `terminate called without an active exception`
line; a rank's own errors and tracebacks, and progress bars drawn with carriage returns,
pass unchanged. End to end: the SIGKILL tests of test_offline_dp.py / test_rl_dp.py assert
the verdict is the only line."""

from __future__ import annotations

import io
import os

from posttrain.train.common.launch import StderrFilter, split_noise

NOISE = b"terminate called without an active exception\n"
TRACEBACK = b'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nValueError: boom\n'


def test_noise_lines_are_dropped_and_everything_else_kept():
    buf = b"UserWarning: careful\n" + NOISE + TRACEBACK + b"terminate called without an active exception\r\n"
    assert split_noise(buf) == (b"UserWarning: careful\n" + TRACEBACK, b"")


def test_a_real_cpp_abort_message_is_kept():
    line = b"terminate called after throwing an instance of 'c10::Error'\n  what():  bad\n"
    assert split_noise(line) == (line, b"")


def test_an_unfinished_line_is_forwarded_at_once_unless_it_may_become_noise():
    bar = b"\rrl:  10%|#         | 1/10 [00:01<00:09]"
    assert split_noise(bar) == (bar, b"")  # a progress bar is not held back
    assert split_noise(b"ok\nterminate call") == (b"ok\n", b"terminate call")
    assert split_noise(b"terminate call" + b"ed without an active exception\n") == (b"", b"")
    assert split_noise(b"terminate call" + b"ing home\n") == (b"terminate calling home\n", b"")


def test_filter_thread_copies_a_pipe_chunk_by_chunk():
    read, write = os.pipe()
    sink = io.BytesIO()
    with os.fdopen(read, "rb", buffering=0) as source:
        thread = StderrFilter(source, sink)
        thread.start()
        # The noise line arrives split across writes; a held prefix that never completes is
        # the rank's own bytes and is written at the end.
        for chunk in (b"step 1\nterm", b"inate called without an ", b"active exception\nerror: x\nterm"):
            os.write(write, chunk)
        os.close(write)
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert sink.getvalue() == b"step 1\nerror: x\nterm"
