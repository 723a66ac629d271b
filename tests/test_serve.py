"""`quill serve`: transformers' OpenAI-compatible server on a Quill folder or pushed repo, checked with the real
OpenAI client and, where Chromium is installed, the web chat page in a headless browser."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest
from planted_chat import ANSWER, QUESTION, answer_tokens, build_chat_model
from test_remote_code import BLOCK_PROJECT

from quill.loading import load_tokenizer
from quill.tools.chat import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

# The launcher is imported first; then every further import of the project fails, so the model that answers can only
# be the code copied beside the checkpoint (trust_remote_code), as on a machine without Quill. argv: quill serve's.
SERVE_WITHOUT_PROJECT = (
    "import sys, quill.tools.serve as serve\n"
    "assert 'quill.model' not in sys.modules\n" + BLOCK_PROJECT + "serve.main(sys.argv[1:])\n"
)


class Server:
    """A server process on a loopback port, its output in a file shown when something fails."""

    def __init__(self, argv: list[str], log_path, env: dict | None = None, timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [*argv, "--port", str(self.port), "--no-browser"], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"server did not come up:\n{self.log()}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return open(self.log_path).read()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def isolated_env(tmp_path) -> dict:
    """No PYTHONPATH (the worktree would be importable) and an empty HF home: nothing but the folder itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HOME", "QUILL_DEBUG")}
    return env | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": REPO}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.getbasetemp() / "planted_chat")


@pytest.fixture(scope="module")
def served(chat_model, tmp_path_factory):
    """`quill serve --trust-remote-code` on the planted model, with the project blocked after the launcher."""
    tmp = tmp_path_factory.mktemp("serve")
    argv = [sys.executable, "-c", SERVE_WITHOUT_PROJECT, str(chat_model), "--trust-remote-code"]
    server = Server(argv, tmp / "server.log", env=isolated_env(tmp))
    yield server
    server.stop()


def test_chat_completion_answers_and_stops_at_the_end_of_the_turn(served, chat_model):
    from openai import OpenAI

    client = OpenAI(base_url=served.url + "/v1", api_key="unused")
    [listed] = client.models.list().data
    assert listed.id == str(chat_model)
    expected_tokens = answer_tokens(load_tokenizer(str(chat_model)))
    messages = [{"role": "user", "content": QUESTION}]

    reply = client.chat.completions.create(model=listed.id, messages=messages, max_tokens=30)
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].finish_reason == "stop"  # not "length": the end-of-turn token ended it
    assert reply.usage.completion_tokens == expected_tokens < 30

    chunks = list(client.chat.completions.create(model=listed.id, messages=messages, max_tokens=30, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == ANSWER and len(pieces) > 1  # streamed token by token
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == expected_tokens
    assert "Traceback" not in served.log()


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver (apt-get install "
    "chromium chromium-driver): the web chat page is not checked in a browser",
)
def test_web_page_completes_an_exchange_in_a_headless_browser(served, tmp_path):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(served.url + "/")
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        driver.find_element(By.ID, "input").send_keys(QUESTION)
        driver.find_element(By.ID, "send").click()
        turn = WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.CSS_SELECTOR, ".turn.assistant[data-state=done]")
        )
        assert turn.get_attribute("data-finish") == "stop", driver.find_element(By.ID, "status").text
        assert turn.find_element(By.CLASS_NAME, "content").text == ANSWER
        assert driver.execute_script("return history") == [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER},
        ]
    finally:
        driver.quit()


def test_a_pushed_quill_repo_serves_with_the_installed_code(chat_model, hub_server, tmp_path):
    hub_server.run_python(
        """
        import sys
        from huggingface_hub import HfApi
        HfApi().create_repo("user/planted-chat")
        HfApi().upload_folder(repo_id="user/planted-chat", folder_path=sys.argv[1])
        """,
        str(chat_model),
    )
    env = hub_server.env(PYTHONPATH=REPO)
    server = Server([sys.executable, "-m", "quill.cli", "serve", "user/planted-chat"], tmp_path / "log", env=env)
    try:
        request = urllib.request.Request(
            server.url + "/v1/chat/completions",
            data=json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 30}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            reply = json.load(r)
    finally:
        server.stop()
    assert reply["model"] == "user/planted-chat@main"
    assert reply["choices"][0]["message"]["content"] == ANSWER and reply["choices"][0]["finish_reason"] == "stop"


def test_stock_transformers_serve_cannot_load_a_custom_code_checkpoint(chat_model, tmp_path):
    """Why quill serve swaps in its own model loader: if this starts failing, transformers has fixed it upstream
    and `remote_code_model_manager` can go."""
    script = BLOCK_PROJECT + textwrap.dedent("""
        import sys
        from transformers.cli.transformers import main
        sys.argv = ["transformers", "serve", *sys.argv[1:]]
        main()
    """)
    port = str(free_port())
    done = subprocess.run(
        [sys.executable, "-c", script, str(chat_model), "--trust-remote-code", "--port", port, "--host", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=isolated_env(tmp_path),
    )
    assert done.returncode != 0
    assert "has no attribute QuillForCausalLM" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: tmp / "missing", "not found"),
        (lambda tmp: tmp, "has no readable config.json"),
        (lambda tmp: _reward_folder(tmp), "is a reward model"),
    ],
)
def test_bad_model_folders_get_one_line(make, expected, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "quill.cli", "serve", str(make(tmp_path)), "--no-browser"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0] and "; fix: " in lines[0]


def _reward_folder(tmp):
    (tmp / "config.json").write_text(json.dumps({"architectures": ["QuillForSequenceClassification"]}))
    return tmp


def test_the_page_is_served_with_its_reply_budget(served):
    with urllib.request.urlopen(served.url + "/", timeout=10) as r:
        page = r.read().decode()
    assert "const MAX_TOKENS = 256;" in page and "/v1/chat/completions" in page
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(served.url + "/nothing-here", timeout=10)
