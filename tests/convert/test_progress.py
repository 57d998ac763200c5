"""Progress output: log lines without a terminal, redrawn bars on one."""

import io
import threading

from nydus_py.convert.progress import Progress, human


def test_human():
    assert [human(n) for n in (0, 1023, 1536, 5 << 20, 3 << 30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 MiB",
                                                                      "3.0 GiB"]


def test_plain_lines_without_a_terminal():
    out = io.StringIO()
    p = Progress(out, tty=False)
    b = p.bar("layer 1/2 sha256:abc")
    b.phase("pull", 2048)
    b.advance(1024)
    b.advance(1024)
    b.finish("pulled 2.0 KiB")
    b.close("done")
    p.log("a message")
    p.close()
    assert out.getvalue().splitlines() == [
        "nydusify-py: layer 1/2 sha256:abc: pull 2.0 KiB",
        "nydusify-py: layer 1/2 sha256:abc: pulled 2.0 KiB",
        "nydusify-py: layer 1/2 sha256:abc: done",
        "nydusify-py: a message",
    ]
    assert "\x1b" not in out.getvalue()


def test_bars_on_a_terminal_are_redrawn_in_place():
    out = io.StringIO()
    p = Progress(out, tty=True)
    a, b = p.bar("layer 1/2"), p.bar("layer 2/2")
    a.phase("pull", 100)
    b.phase("pull", 200)
    a.advance(50)
    text = out.getvalue()
    assert "\x1b[2F" in text  # moved up over the two bars to redraw them
    assert "layer 1/2  pull  [" in text and "0 B/200 B" in text
    threads = [threading.Thread(target=lambda: [b.advance(1) for _ in range(100)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.done == 400
    a.close("finished 100 B")
    p.log("hello")
    p.close()
    final = out.getvalue()
    assert "layer 1/2  finished 100 B\n" in final and "hello\n" in final
    last = final.rstrip("\n").splitlines()[-1]  # still-open bars are left drawn
    assert last.startswith("\x1b[1F\x1b[Jlayer 2/2  pull  [") and "400 B/200 B" in last


def test_quiet_writes_nothing():
    out = io.StringIO()
    for tty in (True, False):
        p = Progress(out, tty=tty, quiet=True)
        b = p.bar("x")
        b.phase("pull", 10)
        b.close("y")
        p.log("z")
        p.close()
    assert out.getvalue() == ""
