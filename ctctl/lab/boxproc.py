"""Run `ctctl load` as a child process and stop it again: how the demo and
the tests drive a box the way a user does (a real controller process, its
control socket, its signals).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import yaml

from ctctl.box import control, state, unload
from ctctl.lab.waiting import wait_until

READY_TIMEOUT = float(os.environ.get("CTCTL_READY_TIMEOUT", "120"))  # BCC compile in a TCG guest


class BoxProcess:
    def __init__(self, config: dict):
        self.config = config
        self.name = config["name"]
        self.proc: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="ctctl-box-")
        self.config_path = os.path.join(self._dir.name, "box.yaml")
        self.log_path = os.path.join(self._dir.name, "controller.log")

    def __enter__(self) -> "BoxProcess":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.config, f)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ctctl", "load", "--config", self.config_path],
                                     stdout=self._log, stderr=subprocess.STDOUT)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ctctl load exited {self.proc.returncode}: {self.log()}")
            try:
                return control.request(self.name, "ping", timeout=2)
            except control.ControlError:
                return None

        try:
            wait_until(ready, READY_TIMEOUT, f"box {self.name} to answer")
        except Exception as e:
            # What the controller said is the cause; the timeout is not.
            raise RuntimeError(f"{e}; controller log:\n{self.log()}") from e

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def request(self, op: str, **args) -> dict:
        return control.request(self.name, op, **args)

    def stats(self) -> dict:
        return self.request("stats")["stats"]

    def kill(self) -> int:
        """`kill -9` the controller, as a crash would end it: its program,
        pins and state file stay as it left them (the next `ctctl load`
        adopts them; stop() unloads them if nobody did).  Its pid."""
        pid = self.proc.pid
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()
        self.proc = None
        return pid

    def stop(self, timeout: float = 30) -> int | None:
        """Stop the controller (politely, then by its pid) and make sure
        nothing of the box is left.  Returns the controller's exit code."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    control.request(self.name, "stop", timeout=5)
                except control.ControlError:
                    self.proc.terminate()
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            rc = self.proc.returncode
            self._log.close()
            self.proc = None
        if state.read_state(self.name) is not None:
            unload.unload(self.name, timeout=5)
        self._dir.cleanup()
        return rc
