"""A Python agent as its own process, for the tests that kill or signal it:
capability ``py-slow`` sleeps for the payload's number of seconds, then
returns ``done by NAME``."""

from __future__ import annotations

import argparse
import asyncio
import logging

import muster


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--drain-grace", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"{args.name} %(levelname)s %(message)s")
    agent = muster.Agent(args.name, args.server, slots=2, drain_grace=args.drain_grace)

    @agent.handler("py-slow")
    async def slow(ctx: muster.TaskContext) -> str:
        ctx.log(f"{args.name} starting")
        await asyncio.sleep(float(ctx.text()))
        return f"done by {args.name}"

    asyncio.run(agent.run())


if __name__ == "__main__":
    main()
