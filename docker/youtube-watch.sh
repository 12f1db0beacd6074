#!/usr/bin/env bash
# The compose `youtube` service: a small watcher around `imaker retrieve youtube`.
#
# Drop a text file with one URL per line (videos, playlists, channels; `#` comments) into
# $IMAKER_INBOX (default $IMAKER_DATA/inbox/youtube). Write it as `name.txt.tmp` and rename
# it to `name.txt` (files ending in .tmp and hidden files are ignored). Each file is
# handed to `imaker retrieve youtube` once, then moved to done/ or failed/ with the
# command's output beside it (`name.txt.log`). Duplicates are harmless: the retriever's
# seen index skips sources it queued before.
#
# Env: YTDL_MODE (audio|video|both), IMAKER_INBOX, IMAKER_INBOX_INTERVAL (seconds, 30).
set -uo pipefail

inbox=${IMAKER_INBOX:-${IMAKER_DATA:-/data}/inbox/youtube}
interval=${IMAKER_INBOX_INTERVAL:-30}
mode=${YTDL_MODE:-audio}
mkdir -p "$inbox" "$inbox/.work" "$inbox/done" "$inbox/failed"

stop=0
trap 'stop=1' INT TERM

# A file left in .work by a killed container is retried.
for f in "$inbox"/.work/*.txt; do
    [ -e "$f" ] && mv -f -- "$f" "$inbox/"
done

echo "youtube watcher: $inbox every ${interval}s (mode $mode)"
while [ "$stop" -eq 0 ]; do
    for f in "$inbox"/*.txt; do
        [ -f "$f" ] || continue
        [ "$stop" -eq 0 ] || break
        name=$(basename -- "$f")
        work="$inbox/.work/$name"
        mv -f -- "$f" "$work" || continue
        mapfile -t urls < <(sed -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -- "$work" | grep -v '^$')
        if [ "${#urls[@]}" -eq 0 ]; then
            dest=done
            echo "no URLs" > "$work.log"
        elif imaker retrieve youtube --mode "$mode" -- "${urls[@]}" > "$work.log" 2>&1; then
            dest=done
        else
            dest=failed
        fi
        stamp=$(date -u +%Y%m%dT%H%M%SZ)
        mv -f -- "$work.log" "$inbox/$dest/$name.$stamp.log"
        mv -f -- "$work" "$inbox/$dest/$name.$stamp"
        echo "$name: $dest (${#urls[@]} URL(s)); log: $inbox/$dest/$name.$stamp.log"
    done
    for _ in $(seq "$interval"); do
        [ "$stop" -eq 0 ] || break
        sleep 1
    done
done
echo "youtube watcher: stopped"
