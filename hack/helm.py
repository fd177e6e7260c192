#!/usr/bin/env python3
"""Helm for kubelock's tests and scripts, without a helm binary.

A small command-line wrapper over the `helm-sdkpy` wheel (the Helm Go SDK as a shared
library; `make helm-sdk` installs it). Commands:

  hack/helm.py lint CHART [--strict]
  hack/helm.py install RELEASE CHART [-n NS] [-f VALUES.yaml]... [--set k=v]... [--set-json k=JSON]...
                 [--create-namespace] [--take-ownership] [--wait] [--timeout SECONDS]
                 [--manifest] [-o text|json]
  hack/helm.py upgrade RELEASE CHART [-n NS] [-f VALUES.yaml]... [--set k=v]... [--set-json k=JSON]...
                 [--reuse-values] [--wait] [--timeout SECONDS] [-o text|json]
  hack/helm.py uninstall RELEASE [-n NS] [--ignore-not-found]
  hack/helm.py manifest RELEASE [-n NS]        the rendered manifest of an installed release
  hack/helm.py notes RELEASE [-n NS]           the NOTES of an installed release

Every command takes --kubeconfig FILE (default $KUBECONFIG, then ~/.kube/config) and
--kube-context NAME. `template` (rendering without a cluster) is not offered: helm-sdkpy's
library exports no dry-run or client-side render; `install --manifest` prints what was
rendered, and `manifest` reads it back from an installed release.

Exit codes: 0 success; 1 Helm refused or failed (its message on stderr, e.g. values that
break values.schema.json); 2 usage; 3 helm-sdkpy is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

SDK_HINT = "pip install --ignore-requires-python helm-sdkpy  (or: make helm-sdk)"


def load_sdk():
    try:
        import helm_sdkpy  # noqa: PLC0415 - imported late for a clear message when missing
    except ImportError as e:
        print(f"helm.py: helm-sdkpy is not installed ({e}); install it with: {SDK_HINT}", file=sys.stderr)
        sys.exit(3)
    return helm_sdkpy


def parse_scalar(text: str) -> Any:
    """Helm's --set typing: true/false/null, integers, else the string."""
    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    try:
        if text.lstrip("-").isdigit() and not (text.lstrip("-").startswith("0") and len(text.lstrip("-")) > 1):
            return int(text)
    except ValueError:
        pass
    return text


def split_path(key: str) -> list[str]:
    """`a.b\\.c` -> ['a', 'b.c'] (a backslash escapes a dot, as in Helm)."""
    parts, cur, escaped = [], "", False
    for ch in key:
        if escaped:
            cur += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ".":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    if any(p == "" for p in parts):
        raise ValueError(f"bad key {key!r}")
    return parts


def set_path(values: dict, key: str, value: Any) -> None:
    parts = split_path(key)
    node = values
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def merge(base: dict, over: dict) -> dict:
    """Deep merge, `over` wins (like several -f files)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def build_values(args: argparse.Namespace) -> dict:
    values: dict = {}
    for path in args.values or []:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            import yaml  # noqa: PLC0415

            doc = yaml.safe_load(text)
        except ImportError:
            doc = json.loads(text)  # JSON is YAML; without PyYAML only JSON files work
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: values must be a mapping")
        values = merge(values, doc)
    for item in args.set or []:
        # Like Helm, one --set may carry several comma-separated assignments.
        for assignment in item.split(","):
            key, sep, raw = assignment.partition("=")
            if not sep:
                raise ValueError(f"--set {assignment!r}: expected key=value")
            set_path(values, key, parse_scalar(raw))
    for item in args.set_json or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set-json {item!r}: expected key=JSON")
        set_path(values, key, json.loads(raw))
    return values


def configuration(sdk, args: argparse.Namespace):
    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG") or None
    if kubeconfig and os.pathsep in kubeconfig:
        kubeconfig = kubeconfig.split(os.pathsep)[0]  # helm-sdkpy takes one file
    return sdk.Configuration(namespace=args.namespace, kubeconfig=kubeconfig, kubecontext=args.kube_context)


def strip_release(release: dict) -> dict:
    """The release without the chart's base64 templates and files (for -o json)."""
    out = {k: v for k, v in release.items() if k != "chart"}
    chart = release.get("chart") or {}
    out["chart"] = {"metadata": chart.get("metadata")}
    return out


def cmd_lint(sdk, args) -> int:
    config = configuration(sdk, args)
    result = asyncio.run(sdk.Lint(config).run(args.chart))
    names = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
    worst = 0
    for msg in result.get("Messages") or []:
        sev = int(msg.get("Severity", 0))
        worst = max(worst, sev)
        text = msg.get("Err")
        # helm-sdkpy serializes Go errors as {}: the text is lost, the path and severity remain.
        detail = text if isinstance(text, str) and text else "(message not exported by helm-sdkpy)"
        print(f"[{names.get(sev, sev)}] {msg.get('Path', '?')}: {detail}")
    errors = [e for e in (result.get("Errors") or []) if e is not None]
    failed = worst >= 3 or bool(errors) or (args.strict and worst >= 2)
    charts = result.get("TotalChartsLinted", 0)
    print(f"{charts} chart(s) linted, {'failed' if failed else 'no failures'}")
    return 1 if failed or charts == 0 else 0


def cmd_install(sdk, args) -> int:
    values = build_values(args)
    config = configuration(sdk, args)
    release = asyncio.run(
        sdk.Install(config).run(
            args.release,
            args.chart,
            values=values or None,
            create_namespace=args.create_namespace,
            wait=args.wait,
            timeout=args.timeout,
            take_ownership=args.take_ownership,
        )
    )
    if args.output == "json":
        print(json.dumps(strip_release(release), indent=2))
        return 0
    info = release.get("info") or {}
    print(f"release {release.get('name')} installed in {release.get('namespace')}: "
          f"revision {release.get('version')}, {info.get('status')}")
    if args.manifest:
        print(release.get("manifest", ""))
    notes = info.get("notes")
    if notes:
        print("NOTES:")
        print(notes)
    return 0


def cmd_upgrade(sdk, args) -> int:
    values = build_values(args)
    config = configuration(sdk, args)
    release = asyncio.run(
        sdk.Upgrade(config).run(
            args.release,
            args.chart,
            values=values or None,
            wait=args.wait,
            timeout=args.timeout,
            reuse_values=args.reuse_values,
        )
    )
    if args.output == "json":
        print(json.dumps(strip_release(release), indent=2))
        return 0
    info = release.get("info") or {}
    print(f"release {release.get('name')} upgraded in {release.get('namespace')}: "
          f"revision {release.get('version')}, {info.get('status')}")
    return 0


def cmd_uninstall(sdk, args) -> int:
    config = configuration(sdk, args)
    try:
        asyncio.run(sdk.Uninstall(config).run(args.release))
    except sdk.ReleaseNotFoundError:
        if args.ignore_not_found:
            print(f"release {args.release} not found")
            return 0
        raise
    print(f"release {args.release} uninstalled")
    return 0


def cmd_status_field(sdk, args, field: str) -> int:
    config = configuration(sdk, args)
    release = asyncio.run(sdk.Status(config).run(args.release))
    if field == "notes":
        print((release.get("info") or {}).get("notes", ""))
    else:
        print(release.get(field, ""))
    return 0


def main(argv: list[str]) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG, ~/.kube/config)")
    common.add_argument("--kube-context", help="kubeconfig context")
    common.add_argument("-n", "--namespace", default="default", help="release namespace (default: default)")

    parser = argparse.ArgumentParser(prog="hack/helm.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("lint", parents=[common], help="lint a chart")
    p.add_argument("chart")
    p.add_argument("--strict", action="store_true", help="fail on warnings too")

    p = sub.add_parser("install", parents=[common], help="install a chart")
    p.add_argument("release")
    p.add_argument("chart")
    p.add_argument("-f", "--values", action="append", metavar="FILE", help="values file (YAML)")
    p.add_argument("--set", action="append", metavar="K=V", help="set a value (a.b=c; true/false/ints typed)")
    p.add_argument("--set-json", action="append", metavar="K=JSON", help="set a value to a JSON document")
    p.add_argument("--create-namespace", action="store_true")
    p.add_argument("--take-ownership", action="store_true",
                   help="adopt existing objects (e.g. CRDs installed by other means)")
    p.add_argument("--wait", action="store_true", help="wait until the objects are ready")
    p.add_argument("--timeout", type=int, default=300, metavar="SECONDS")
    p.add_argument("--manifest", action="store_true", help="print the rendered manifest")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")

    p = sub.add_parser("upgrade", parents=[common], help="upgrade an installed release")
    p.add_argument("release")
    p.add_argument("chart")
    p.add_argument("-f", "--values", action="append", metavar="FILE", help="values file (YAML)")
    p.add_argument("--set", action="append", metavar="K=V", help="set a value (a.b=c; true/false/ints typed)")
    p.add_argument("--set-json", action="append", metavar="K=JSON", help="set a value to a JSON document")
    p.add_argument("--reuse-values", action="store_true",
                   help="merge these values over the release's current ones (default: over the chart's)")
    p.add_argument("--wait", action="store_true", help="wait until the objects are ready")
    p.add_argument("--timeout", type=int, default=300, metavar="SECONDS")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")

    p = sub.add_parser("uninstall", parents=[common], help="uninstall a release")
    p.add_argument("release")
    p.add_argument("--ignore-not-found", action="store_true")

    for name in ("manifest", "notes"):
        p = sub.add_parser(name, parents=[common], help=f"print the {name} of an installed release")
        p.add_argument("release")

    args = parser.parse_args(argv)
    sdk = load_sdk()
    try:
        if args.command == "lint":
            return cmd_lint(sdk, args)
        if args.command == "install":
            return cmd_install(sdk, args)
        if args.command == "upgrade":
            return cmd_upgrade(sdk, args)
        if args.command == "uninstall":
            return cmd_uninstall(sdk, args)
        return cmd_status_field(sdk, args, args.command)
    except (ValueError, OSError) as e:
        print(f"helm.py {args.command}: {e}", file=sys.stderr)
        return 2
    except sdk.HelmError as e:
        print(f"helm.py {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
