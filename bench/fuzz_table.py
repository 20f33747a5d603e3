"""Print `make fuzz`'s figures (bench/fuzz.json) as the markdown table in bench/RESULTS.md."""

import json
import sys
from pathlib import Path

stats = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/fuzz.json").read_text())
print("| handler | inputs | replies by code (or closed stream) | crashes | hangs | peer RSS before / after | seconds |")
print("|---|---|---|---|---|---|---|")
for name, s in stats.items():
    replies = ", ".join(f"{k} {v}" for k, v in sorted(s["replies"].items(), key=lambda kv: -kv[1]))
    print(f"| {name} | {s['inputs']:,} | {replies} | {s['crashes']} | {s['hangs']} | "
          f"{s['rss_mb_before']} / {s['rss_mb_after']} MB ({s.get('rss_of', 'peer process')}) | {s['seconds']} |")
categories = {}
for s in stats.values():
    for k, v in s["categories"].items():
        categories[k] = categories.get(k, 0) + v
print()
print("Inputs by category, all handlers: " + ", ".join(f"{k} {v:,}" for k, v in sorted(categories.items(), key=lambda kv: -kv[1])))
