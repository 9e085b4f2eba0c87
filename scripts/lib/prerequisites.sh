# Installs what drover's tests and demo need and this machine lacks (as root, with apt-get):
# Nix (single-user, from Debian's nix-bin), the PostgreSQL server binaries, promtool and Chromium. Sourced by
# scripts/test and scripts/demo.
install_prerequisites() {
  local missing=()
  command -v nix-store >/dev/null 2>&1 || missing+=(nix-bin)
  # `script` gives the CLI's progress-display test a terminal.
  command -v script >/dev/null 2>&1 || missing+=(bsdutils)
  # tmux gives the watch test an 80-column terminal whose screen it reads back.
  command -v tmux >/dev/null 2>&1 || missing+=(tmux)
  # The systemd units are checked with `systemd-analyze verify`.
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  # The metrics tests check the runner's metrics and the alert rules with promtool.
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  # The status page test loads it in headless Chromium (Debian's package: nothing downloads a
  # browser).
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  # The certificate-reload test reads the certificate the runner serves with `openssl s_client`.
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  # Throwaway PostgreSQL clusters need the server binaries, not a running service.
  if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    missing+=(postgresql)
  fi
  # The plain-host install test follows docs/operations.md: `createuser` run as the OS user
  # `postgres`, which the package creates.
  if ! id -u postgres >/dev/null 2>&1 || ! command -v createuser >/dev/null 2>&1; then
    missing+=(postgresql)
  fi
  if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
      echo "missing ${missing[*]}; run as root so it can be installed with apt-get" >&2
      return 1
    fi
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}
