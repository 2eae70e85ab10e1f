"""`vlab fleet run` and `vlab fleet report`: their options and what each runs.

Kept apart from vlab/cli.py (which only adds the `fleet` sub-parser and dispatches here) so
that building the `vlab` parser imports nothing of Ansible or the report.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser, parser_class) -> None:
    """The `fleet` sub-commands of `vlab`."""
    sub = p.add_subparsers(dest="fleet_command", parser_class=parser_class,
                           metavar="{run,report}")
    sub.required = True
    r = sub.add_parser("run", help="run vlab on every inventory host through Ansible and "
                                   "fetch the results")
    r.add_argument("-i", "--inventory", required=True, help="an Ansible inventory")
    r.add_argument("selectors", nargs="*", metavar="SELECTOR",
                   help="experiments, as for `vlab run` (default: the quick suite)")
    r.add_argument("--suite", help="suite name, as for `vlab run`")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter axis, as for `vlab run`")
    r.add_argument("--processes", type=int, help="pyperf worker processes per case")
    r.add_argument("--values", type=int, help="pyperf values per process")
    r.add_argument("--forks", type=int, default=5,
                   help="hosts Ansible works on at once (default 5)")
    r.add_argument("-o", "--out", "--resume", dest="out", metavar="DIR",
                   help="the fleet directory (default results/fleet/<stamp>); an existing "
                        "one is resumed: only hosts without results run again")
    r.add_argument("--limit", metavar="PATTERN", help="an Ansible host pattern")
    r.add_argument("--dist", metavar="WHEEL",
                   help="the wheel to install on the hosts (default: built from this tree)")
    r.add_argument("--timeout", type=float, default=4 * 3600.0,
                   help="bound on the whole run in seconds (default 4 h)")
    rp = sub.add_parser("report", help="one HTML across a fleet's hosts, against a baseline")
    rp.add_argument("dir", metavar="DIR", help="a fleet directory (results/fleet/<stamp>)")
    rp.add_argument("-o", "--output", metavar="report.html",
                    help="default DIR/report.html")
    rp.add_argument("--baseline", metavar="HOST",
                    help="the host every other is compared with (default: the first with "
                         "results)")
    rp.add_argument("--min-effect", type=float, default=0.02,
                    help="smallest relative change that counts (default 0.02)")


def run_cli(args: argparse.Namespace) -> int:
    """Run the parsed `vlab fleet` command; the exit code (1 when any host is an error row)."""
    if args.fleet_command == "report":
        from vlab.fleet.report import fleet_report

        path = fleet_report(args.dir, args.output, baseline=args.baseline,
                            min_effect=args.min_effect)
        print(path)
        return 0
    from vlab.fleet.run import FleetOptions, exit_code, format_hosts, run_fleet

    opts = FleetOptions(inventory=args.inventory, selectors=args.selectors, suite=args.suite,
                        params=args.param, processes=args.processes, values=args.values,
                        forks=args.forks, out=args.out, limit=args.limit, dist=args.dist,
                        timeout=args.timeout, progress=sys.stderr)
    try:
        manifest = run_fleet(opts)
    except KeyboardInterrupt:
        print("vlab fleet: interrupted; what was fetched is kept (resume with --resume DIR)",
              file=sys.stderr)
        return 130
    print(format_hosts(manifest))
    print(f"\nfleet: {manifest['dir']}")
    return exit_code(manifest)
