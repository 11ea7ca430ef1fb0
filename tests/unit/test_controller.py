"""The controller's per-packet path without a kernel: punts built by hand,
and a transmitter that records instead of sending.  The recorder stands in
for AF_PACKET, which needs root and a namespace; the real one carries every
punt of the bpf and integration tiers."""

from __future__ import annotations

import pytest

pytest.importorskip("scapy.all")
from scapy.all import Ether, Raw, raw  # noqa: E402

from ctctl import abi
from ctctl.box import controller  # noqa: E402
from ctctl.box.config import BoxConfig  # noqa: E402
from ctctl.box.controller import Controller  # noqa: E402
from ctctl.nic.punts import Punt  # noqa: E402

from checksums import checksums_ok, pseudo_header_sum, with_l4_checksum  # noqa: E402
from helpers import tcp, v4  # noqa: E402

IFINDEX = {"eth5": 2, "eth6": 3}


class Recorder:
    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    def send(self, port: str, frame) -> None:
        self.sent.append((port, bytes(frame)))


def forwarding_box() -> Controller:
    ctl = Controller(BoxConfig(name="unit", netns="unit-box", ports=["eth5", "eth6"],
                               forward={"eth5": "eth6", "eth6": "eth5"}))
    ctl.port_by_ifindex = {i: p for p, i in IFINDEX.items()}
    ctl.transmitter = Recorder()
    return ctl


def punt(frame: bytes, port: str = "eth5") -> Punt:
    hdr = abi.PuntHdr(reason=abi.Reason.NO_OFFLOAD, ifindex=IFINDEX[port], pkt_len=len(frame))
    return Punt(hdr, bytearray(frame), 0)


def syn(payload: bytes = b"") -> bytes:
    return raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / v4() / tcp() / Raw(payload))


def test_a_partial_checksum_is_completed_before_the_packet_goes_on():
    ctl = forwarding_box()
    # As a sender with checksum offload hands it to its device.
    sent_by_host = bytes(with_l4_checksum(syn(b"hello"), pseudo_header_sum(syn(b"hello"))))
    assert not checksums_ok(sent_by_host)
    ctl.handle(punt(sent_by_host))
    assert ctl.transmitter.sent == [("eth6", syn(b"hello"))]
    assert ctl.dispatch({"op": "stats"})["stats"]["software"]["csum_completed"] == 1


def test_complete_and_other_wrong_checksums_go_on_unchanged():
    ctl = forwarding_box()
    corrupt = bytearray(syn())
    corrupt[-3] ^= 0x10          # a byte of the TCP checksum
    for frame in (syn(), bytes(corrupt)):
        ctl.handle(punt(frame))
    assert ctl.transmitter.sent == [("eth6", syn()), ("eth6", bytes(corrupt))]
    assert ctl.dispatch({"op": "stats"})["stats"]["software"]["csum_completed"] == 0


def test_a_bug_costs_one_packet_and_is_logged_once(monkeypatch, capsys):
    ctl = forwarding_box()

    def broken(pkt):
        raise RuntimeError("a bug")

    monkeypatch.setattr(controller, "complete_partial_checksum", broken)
    for _ in range(3):
        ctl.handle(punt(syn()))
    assert ctl.drops == {"error_RuntimeError": 3} and ctl.transmitter.sent == []
    assert capsys.readouterr().err.count("RuntimeError: a bug") == 1
    monkeypatch.undo()
    ctl.handle(punt(syn()))
    assert ctl.transmitter.sent == [("eth6", syn())]
