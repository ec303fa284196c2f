"""Every timing and size limit of the desktop-agent protocol, with its unit.

One place, so the agent, the desktop client, the tests and the benchmark agree;
tests shorten the timings by passing their own values where a function takes one.
"""
from __future__ import annotations

# -- sizes (bytes) ---------------------------------------------------------------------

KIB = 1024
MIB = 1024 * KIB

CHUNK_BYTES = 512 * KIB  # most payload bytes in one binary chunk frame (the limit)
MAX_FRAME_BYTES = 4 * MIB  # the WebSocket's max_size: a larger frame is refused with close code 1009
# A global b of SmolLM2 with all 30 layers trainable (184k float32) is ~1 MiB as base64:
# 4 MiB leaves room for larger adapters without letting one frame hold a whole weights file.
CHUNK_WINDOW = 8  # chunks the client keeps in flight before waiting for an ack (4 MiB at 512 KiB)
METRICS_PER_FRAME = 256  # most step metrics coalesced into one frame when the link is slow
HASH_READ_BYTES = 1 * MIB  # read size when hashing a stored or partial file
LINK_SAMPLE_BYTES = 4 * MIB  # a transfer at least this long measures the agent's link (shorter: the window's burst)
# A round's paced frames (StartRound down, RoundDone up: shared.pacing) go out as WebSocket
# fragments of this many bytes, each released when the allotted rate has carried the ones before:
# small enough to follow the rate closely (16 KiB is 1 s at 128 kbit/s), large enough that a fast
# share costs few wake-ups (a 1 MiB global b is 64 fragments).
PACE_FRAGMENT_BYTES = 16 * KIB
# b crosses the wire as base64 text (shared.protocol.encode_f32): 4 characters for every 3 bytes
# of float32, so a round moves 4/3 of the adapter's bytes (the cost model counts these).
B_WIRE_BYTES_PER_BYTE = 4 / 3

# -- timings (seconds) -----------------------------------------------------------------

PING_INTERVAL_S = 5.0  # WebSocket ping every this many seconds on an idle connection (both sides)
PING_TIMEOUT_S = 15.0  # a connection whose pong is this late is dead (a cut Wi-Fi, a pulled plug)
OPEN_TIMEOUT_S = 10.0  # the opening handshake must finish within this
CLOSE_TIMEOUT_S = 2.0  # wait this long for the peer's close frame before dropping the TCP connection
REQUEST_TIMEOUT_S = 30.0  # a request (hello, offer, data, start round, pause...) unanswered this long failed
PROGRAM_LOAD_TIMEOUT_S = 300.0  # loading a program, or measuring with the probe (a Pi packs 500 MB of weights)
RECONNECT_FIRST_S = 0.2  # first wait before reconnecting after a lost connection
RECONNECT_CAP_S = 10.0  # the backoff doubles up to this wait
RECONNECT_JITTER = 0.5  # each wait is scaled by a uniform factor in [1 - jitter, 1]
LOST_PATIENCE_S = 30.0  # a device whose connection is down this long is lost: the engine re-plans without it
OUTBOX_COMPACT_EVERY = 512  # rewrite the agent's metric outbox after this many acknowledged entries

# -- the opening handshake -------------------------------------------------------------

TOKEN_HEADER = "Authorization"  # value "Bearer <token>"; missing or wrong: HTTP 401 before any frame
PROTOCOL_HEADER = "Deftly-Protocol"  # the client's protocol version; another one: HTTP 400
DESKTOP_HEADER = "Deftly-Desktop"  # the desktop's stable id; another desktop's while one is served: HTTP 409
WS_PATH = "/deftly"  # the one WebSocket endpoint
TOKEN_BYTES = 16  # random bytes of a generated pairing token (printed as 32 hex digits)

# -- close codes (RFC 6455) ------------------------------------------------------------

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the agent shuts down, or a newer connection from the same desktop took over
CLOSE_POLICY = 1008  # a frame that breaks the protocol: malformed, wrong shape, wrong version, out of place
CLOSE_TOO_BIG = 1009  # a frame over MAX_FRAME_BYTES (websockets closes with it itself)
