export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TORCHFUSE_CACHE_DIR=/tmp/tfc15
timeout 330 python3 -m pytest -q tests -n 12 -p no:cacheprovider --tb=short -rf > /tmp/t.txt 2>&1
tail -1 /tmp/t.txt; tail -1 /tmp/t.txt > $OUT/tests.txt
grep -a "^FAILED" /tmp/t.txt | head -20
timeout 250 python3 -m torchfuse.bench --device cuda --json $OUT/bench.json > $OUT/bench.md 2> /tmp/bench.err; tail -2 /tmp/bench.err
head -22 $OUT/bench.md | tail -16; grep -A18 "^Compile" $OUT/bench.md; grep "four fusion" $OUT/bench.md
