#!/usr/bin/env bash
# The live test against the real SillyTavern (issue 18, item 7): install SillyTavern 1.19.0 from
# the npm registry (once, into bench-out/), start it on 127.0.0.1 with a config for automation,
# start web_demo.py --api_only on the quickstart's tiny model, and drive SillyTavern in headless
# Chromium through a recording proxy (bench/sillytavern_drive.py). Every request body SillyTavern
# sends is written to tests/data/sillytavern/<mode>-<scenario>.json with the status it got today;
# screenshots, the request log and both servers' logs go to bench-out/sillytavern/.
#
#     bash bench/sillytavern.sh
#
# Needs node >= 20 and npm (apt-get install nodejs npm), /usr/bin/chromium and the Python packages
# of requirements.txt. The first run also builds runs/quickstart/merged (scripts/quickstart.sh)
# when it is missing, installs SillyTavern (about 400 MB of node_modules) and lets it compile its
# frontend once; later runs reuse all three. Everything listens on 127.0.0.1 only; the only
# network use is the npm registry. Every process started here is ended on exit.
# SILLYTAVERN_MODEL, ST_PORT, API_PORT and PROXY_PORT override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.19.0
out=bench-out/sillytavern
model=${SILLYTAVERN_MODEL:-runs/quickstart/merged}
st_port=${ST_PORT:-8123}
api_port=${API_PORT:-9191}
proxy_port=${PROXY_PORT:-9192}
start=$SECONDS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the tiny model gains nothing from a second thread

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

problems=()
node_major=$(node --version 2>/dev/null | sed -E 's/^v([0-9]+).*/\1/' || true)
[ -n "$node_major" ] && [ "$node_major" -ge 20 ] || problems+=("error: node >= 20 is needed (SillyTavern $version's engines field); apt-get install nodejs npm")
command -v npm >/dev/null || problems+=("error: npm is missing; apt-get install npm")
[ -x /usr/bin/chromium ] || problems+=("error: /usr/bin/chromium is missing; apt-get install chromium")
for port in "$st_port" "$api_port" "$proxy_port"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then problems+=("error: port $port on 127.0.0.1 is taken"); fi
done
if [ ${#problems[@]} -gt 0 ]; then printf '%s\n' "${problems[@]}" >&2; exit 2; fi
mkdir -p "$out"

# ---- SillyTavern from the npm registry, once
st=$out/sillytavern-$version
if [ ! -f "$st/node_modules/.package-lock.json" ]; then
    echo "installing sillytavern@$version from the npm registry"
    tmp=$(mktemp -d "$out/.install.XXXXXX")
    (cd "$tmp" && npm pack --silent "sillytavern@$version" >/dev/null && tar xzf "sillytavern-$version.tgz")
    (cd "$tmp/package" && npm install --omit=dev --no-audit --no-fund --loglevel=error)
    rm -rf "$st"
    mv "$tmp/package" "$st"
    rm -rf "$tmp"
fi

# ---- its config: loopback only, no auth, no browser launch, nothing fetched from the network
# (its first page load asks AI Horde for its status, the default API until the drive picks Chat
# Completion: every outgoing request but those to 127.0.0.1 goes to a request proxy on a closed
# loopback port, and fails there). A fresh user folder each run (so the first-run onboarding and
# the default settings each time); the rest of the data folder keeps the compiled frontend.
data=$(realpath -m "$out/st-data")
rm -rf "$data/default-user"
mkdir -p "$data"
cat > "$out/config.yaml" <<EOF
dataRoot: $data
listen: false
port: $st_port
whitelistMode: true
whitelist:
  - 127.0.0.1
  - ::1
whitelistDockerHosts: false
basicAuthMode: false
enableUserAccounts: false
browserLaunch:
  enabled: false
extensions:
  enabled: true
  autoUpdate: false
  models:
    autoDownload: false
enableDownloadableTokenizers: false
requestProxy:
  enabled: true
  url: http://127.0.0.1:9
  bypass:
    - 127.0.0.1
    - localhost
logging:
  enableAccessLog: false
EOF

# ---- the model: the quickstart's tiny Baichuan2, trained on data/sample's three roles
if [ ! -f "$model/config.json" ]; then
    echo "$model is missing: building it with scripts/quickstart.sh"
    QUICKSTART_SKIP_INSTALL=1 bash scripts/quickstart.sh > "$out/quickstart.log" 2>&1
fi

# ---- both servers, then the drive
config=$(realpath "$out/config.yaml")
(cd "$st" && exec node server.js --configPath "$config") > "$out/sillytavern.log" 2>&1 &
pids+=($!)
python3 web_demo.py --model_path "$model" --api_only --port "$api_port" --log_requests > "$out/web_demo.log" 2>&1 &
pids+=($!)
wait_for() {  # url, name, pid: until the url answers, while the process lives (first compile: minutes)
    local deadline=$((SECONDS + 600))
    until curl -s -o /dev/null "$1"; do
        kill -0 "$3" 2>/dev/null || { echo "error: $2 exited; see $out/$2.log" >&2; exit 1; }
        [ $SECONDS -lt $deadline ] || { echo "error: $2 did not answer $1 within 600 s" >&2; exit 1; }
        sleep 1
    done
}
wait_for "http://127.0.0.1:$st_port/" sillytavern "${pids[0]}"
wait_for "http://127.0.0.1:$api_port/v1/models" web_demo "${pids[1]}"
echo "SillyTavern $version on 127.0.0.1:$st_port, web_demo.py on 127.0.0.1:$api_port ($model), $((SECONDS - start)) s"

python3 bench/sillytavern_drive.py --st_url "http://127.0.0.1:$st_port" --api_url "http://127.0.0.1:$api_port" \
    --proxy_port "$proxy_port" --shots_out "$out" --docs_image docs/img/sillytavern.png
echo "bench/sillytavern.sh: $((SECONDS - start)) s in all"
