# Shared by the bench/*.sh scripts: runs `qwentune bench ARGS` and appends its JSON line, tagged
# with {"case": CASE}, to FILE (also echoed). Usage: bench_case QWENTUNE CASE FILE ARGS...
bench_case() {
  local q=$1 case=$2 file=$3
  shift 3
  local line
  line=$(timeout 280 "$q" bench "$@" | grep '^{')
  echo "$line"
  [ -n "$line" ] && python3 -c 'import json,sys; d=json.loads(sys.argv[2]); d["case"]=sys.argv[1]; print(json.dumps(d))' \
    "$case" "$line" >> "$file"
}
