"""Benchmarks: each ``bench_*.py`` exposes ``main(quick) -> rows`` and measures its own baseline."""


def print_rows(rows) -> None:
    """The console table every benchmark prints when run on its own."""
    width = max([len(r["name"]) for r in rows] + [9]) + 2
    print(f"{'benchmark':<{width}} {'value':>10} {'baseline':>10} {'ratio':>7} {'goal':>8}")
    for r in rows:
        print(f"{r['name']:<{width}} {r['value']!s:>10} {r['baseline']!s:>10} {r['ratio']!s:>7} {r['goal']!s:>8}  "
              f"({r.get('unit', '')}; {r.get('notes', '')})")
