"""The serving side of the sidecar link, one package for what a server needs to learn online.

A server ships its step records to the sidecar and takes weight versions back, and neither direction may block
or break a serving step: `wire` (the msgpack messages, schema-checked and size-limited: everything that
crosses a socket), `settings` (`ADASPEC_TRANSPORT_*`: endpoints, CURVE keys, queue depths, timeouts),
`transport` (the four ZeroMQ channels: logs PUSH, weights PUB, sync and admin REQ/REP), `logs` (the step
listener that batches records into log messages, never blocking), `weights` (validate an update off the hot
path, swap it in place between steps; the subscriber thread), `guard` (fall back to the static head while the
sidecar is silent), and `attach` (`OnlineAdaptive`: all of that wired onto one reference engine). The trainer
process itself is `adaspec.sidecar`, which this package never imports.
"""
