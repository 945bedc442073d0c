"""How the commands log: FAISS's narration of which build it loaded, and transformers' bar for
every model it reads, show only with --verbose."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from citeqa import logs
from citeqa.logs import QUIET_UNLESS_VERBOSE, quiet_weight_loading, setup_logging


def test_setup_quiets_the_narrators_unless_verbose() -> None:
    try:
        setup_logging()
        assert all(logging.getLogger(n).level == logging.WARNING for n in QUIET_UNLESS_VERBOSE)
        setup_logging(verbose=True)
        assert all(logging.getLogger(n).level == logging.NOTSET for n in QUIET_UNLESS_VERBOSE)
    finally:
        for n in QUIET_UNLESS_VERBOSE:
            logging.getLogger(n).setLevel(logging.NOTSET)


def build(tmp_path: Path, *flags: str) -> str:
    """stderr of `citeqa [flags] index build` over one small file (tiny preset: FAISS is
    imported for its dense index)."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The comet returns every seventy-six years. Halley predicted it.")
    out = tmp_path / f"index{len(flags)}"
    r = subprocess.run([sys.executable, "-c", "from citeqa.cli import main; main()", *flags,
                        "index", "build", str(doc), "--out", str(out), "--preset", "tiny"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").is_file()
    return r.stderr


def test_a_command_does_not_narrate_faiss_loading(tmp_path: Path) -> None:
    assert "faiss.loader" not in build(tmp_path)
    assert "faiss.loader" in build(tmp_path, "--verbose")  # still there when asked for


@pytest.fixture
def bars_on():
    from transformers.utils import logging as hf_logging

    logs._verbose = False  # an earlier in-process command may have run with --verbose
    hf_logging.enable_progress_bar()
    yield hf_logging
    logs._verbose = False
    hf_logging.enable_progress_bar()


def test_quiet_weight_loading_turns_the_bars_off_and_back_on(bars_on) -> None:
    with quiet_weight_loading():
        assert not bars_on.is_progress_bar_enabled()
        with quiet_weight_loading():  # nested (a loader inside a loader)
            assert not bars_on.is_progress_bar_enabled()
        assert not bars_on.is_progress_bar_enabled()  # the outer block is still open
    assert bars_on.is_progress_bar_enabled()
    bars_on.disable_progress_bar()  # a caller who turned them off keeps them off
    with quiet_weight_loading():
        pass
    assert not bars_on.is_progress_bar_enabled()


def test_quiet_weight_loading_keeps_the_bars_with_verbose(bars_on) -> None:
    setup_logging(verbose=True)
    try:
        with quiet_weight_loading():
            assert bars_on.is_progress_bar_enabled()
    finally:
        setup_logging()


def test_reading_an_encoder_draws_no_bar(tiny_encoder, tokenizer, tmp_path: Path, capfd,
                                         bars_on) -> None:
    from transformers import AutoModel

    from citeqa.reward.checkpoint import read_encoder

    tiny_encoder(tokenizer.vocab_size).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    capfd.readouterr()
    AutoModel.from_pretrained(tmp_path, local_files_only=True)  # as transformers draws it
    assert "Loading weights" in capfd.readouterr().err
    read_encoder(tmp_path, "hint")
    assert "Loading weights" not in capfd.readouterr().err


@pytest.mark.parametrize("verbose", [False, True])
def test_an_incomplete_encoder_is_refused_without_transformers_load_report(
        tiny_encoder, tokenizer, tmp_path: Path, capfd, caplog, verbose: bool) -> None:
    """The table of missing weights was printed first, then citeqa's own error saying the
    same; it shows with --verbose still, and only for this thread's load."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from citeqa.errors import ModelError
    from citeqa.logs import LOAD_REPORT_LOGGER
    from citeqa.reward.checkpoint import read_encoder

    tiny_encoder(tokenizer.vocab_size).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if not k.startswith("encoder.layer.0.")},
              str(weights))
    caplog.set_level(logging.WARNING, logger=LOAD_REPORT_LOGGER)
    AutoModel.from_pretrained(tmp_path, local_files_only=True)  # as transformers reports it
    assert "LOAD REPORT" in caplog.text + capfd.readouterr().err
    caplog.clear()
    setup_logging(verbose=verbose)
    try:
        with pytest.raises(ModelError, match="missing"):
            read_encoder(tmp_path, "hint")
    finally:
        setup_logging()
    shown = caplog.text + capfd.readouterr().err
    assert ("LOAD REPORT" in shown) == verbose
    assert not logging.getLogger(LOAD_REPORT_LOGGER).filters
    AutoModel.from_pretrained(tmp_path, local_files_only=True)  # the filter is gone
    assert "LOAD REPORT" in caplog.text + capfd.readouterr().err


def test_a_reshaped_encoder_weight_is_named_and_a_failed_load_shows_the_report(
        tiny_encoder, tokenizer, tmp_path: Path, capfd, caplog) -> None:
    """A weight of another shape: transformers raised, its error saying only "see the report
    above", which was held back. citeqa's error names the weight now; and a block that
    raises logs the report it held."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from citeqa.errors import ModelError
    from citeqa.logs import LOAD_REPORT_LOGGER, without_load_report
    from citeqa.reward.checkpoint import read_encoder

    tiny_encoder(tokenizer.vocab_size).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    name = "encoder.layer.0.intermediate.dense.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(weights))
    caplog.set_level(logging.WARNING, logger=LOAD_REPORT_LOGGER)
    with pytest.raises(ModelError, match=f"1 of another shape \\({name}\\)"):
        read_encoder(tmp_path, "hint")
    assert "LOAD REPORT" not in caplog.text + capfd.readouterr().err
    with pytest.raises(RuntimeError), without_load_report():
        AutoModel.from_pretrained(tmp_path, local_files_only=True)  # raises after its report
    assert "LOAD REPORT" in caplog.text + capfd.readouterr().err
    assert not logging.getLogger(LOAD_REPORT_LOGGER).filters


def test_no_log_line_holds_a_urls_password() -> None:
    """httpx logs each request's URL at INFO: a CITEQA_GENERATOR_URL's user:password@ was in
    the log of every engine call (three a question)."""
    # (the passwords are made as it runs: Python 3.13's report of a logging error shows the
    # -c line's source, which must not hold them)
    code = ("from citeqa.logs import setup_logging; setup_logging(); import httpx; "
            "c = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200))); "
            "c.get('http://user:' + 's3' + 'cret@engine.example:8401/v1/models'); "
            "import logging; logging.getLogger('x').info('at %s', 'https://u:p%' + '40w@h.ex/'); "
            "logging.getLogger('x').info('%d args', 'http://u:hid' + 'den@h.ex/');"
            "logging.getLogger('x').info('%d args', ['http://u:hid' + 'den@h.ex/']);"
            "logging.getLogger('x').info(ValueError('http://u:hid' + 'den@h.ex/'), 1);"
            "logging.getLogger('x').info('%(a)d', {'http://u:hid' + 'den@h.ex/': 1, 'a': 's'});"
            "print('still running')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "GET http://engine.example:8401/v1/models" in r.stderr, r.stderr
    assert "at https://h.ex/" in r.stderr, r.stderr
    assert "s3cret" not in r.stderr and "p%40w" not in r.stderr, r.stderr
    # a record whose args do not fit is said, with them: each URL without its password
    assert "hidden" not in r.stderr and "'http://h.ex/'" in r.stderr, r.stderr
    assert r.stderr.count("a log record that cannot be formatted (TypeError") == 4, r.stderr
    assert "still running" in r.stdout  # a record whose args do not fit: reported, not raised


def test_without_userinfo_reads_urls_inside_text() -> None:
    from citeqa.text import without_userinfo

    assert without_userinfo("http://a:b@h/x") == "http://h/x"
    assert without_userinfo('GET "ftp://a@h" and (https://x:y@z:1/p?q=a@b)') == (
        'GET "ftp://h" and (https://z:1/p?q=a@b)')
    assert without_userinfo("mail me at a@b.org; see http://h/p@x") == (
        "mail me at a@b.org; see http://h/p@x")
    # a URL's authority ends at whitespace: a later address in the text is not its userinfo
    assert without_userinfo("fetched http://h.org for me@x.org") == (
        "fetched http://h.org for me@x.org")


def test_a_heartbeat_says_how_far_long_work_is_at_most_every_period(monkeypatch, caplog) -> None:
    """A book's build, logged to a file, said nothing for 4.5 minutes of embedding."""
    import logging

    from citeqa import logs

    now = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    logger = logging.getLogger("citeqa.test.heartbeat")
    beat = logs.Heartbeat(logger, "embedding", 100, "passages", every_s=30.0)
    quiet = logs.Heartbeat(logger, "embedding", 100, "passages", on=False, every_s=30.0)
    with caplog.at_level(logging.INFO, logger="citeqa.test.heartbeat"):
        for _ in range(10):
            now[0] += 10.0
            beat.update(10)
            quiet.update(10)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["embedding: 30 of 100 passages (1/s)", "embedding: 60 of 100 passages (1/s)",
                    "embedding: 90 of 100 passages (1/s)"], said  # (none at the end: done)
