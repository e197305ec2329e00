"""An agent with capability ``py-echo`` that returns its payload as its output.

    python examples/echo_agent.py --server http://127.0.0.1:7070
    muster task submit py-echo --payload 'hello' --wait

Credentials come from ``--token``/``MUSTER_TOKEN`` and the ``MUSTER_TLS_*``
variables. SIGTERM or Ctrl-C drains: running tasks finish, then it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import muster


def build(server: list[str], name: str = "py-echo", token: str | None = None, slots: int = 4) -> muster.Agent:
    agent = muster.Agent(name, server, slots=slots, token=token)

    @agent.handler("py-echo")
    async def echo(ctx: muster.TaskContext) -> muster.Output:
        ctx.log(f"echoing {len(ctx.payload)} bytes")
        await ctx.progress(100, "echoed")
        return muster.Output(ctx.payload, ctx.content_type)

    return agent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--server", action="append", help="server endpoint; repeat for several (default 127.0.0.1:7070)"
    )
    parser.add_argument("--name", default="py-echo")
    parser.add_argument("--token", default=None)
    parser.add_argument("--slots", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = build(args.server or ["http://127.0.0.1:7070"], args.name, args.token, args.slots)
    asyncio.run(agent.run())


if __name__ == "__main__":
    main()
