# services.drover.builder: a drover builder as a systemd service (Type=notify, watchdog, drain on
# stop), its configuration generated from typed options with the TOML generator, its key read
# from a path at run time. The builder runs as root (each build gets a PID namespace of its own,
# and it adds paths to the Nix store), which the module makes a Nix trusted user explicitly: it
# passes the farm's cache and keys to the daemon as substituters.
#
# Where builds run is `settings.executor.store`. With "daemon" (the default, NixOS's multi-user
# Nix) steps build through the local nix-daemon, in its sandbox and outside this unit, so the unit
# keeps the whole hardening and may write only the garbage-collector roots it pins outputs with
# (/nix/var/nix/gcroots/drover). With "local" the builder opens the store itself and needs /nix
# writable; its builds then inherit this unit's restrictions, which break Nix's sandbox (a
# read-only /proc/sys forbids the sandbox's /proc), so that mode suits hosts without a daemon.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.drover.builder;
  common = import ./common.nix { inherit lib; };
  toml = pkgs.formats.toml { };
  executor = cfg.settings.executor;
  # A noop builder runs no Nix at all: no daemon to wait for, nothing of /nix to write.
  daemon = executor.kind == "nix" && executor.store == "daemon";
  storeAccess =
    if executor.kind == "noop" then [ ]
    else if daemon then [ "/nix/var/nix/gcroots" ]
    else [ "/nix" ];
  # The builder's parser refuses unknown keys and reads [executor] by its kind, so a noop
  # executor must not carry the Nix executor's keys (`store` has a default, so it is always set).
  nixOnlyKeys = [ "cache_url" "trusted_public_keys" "store" "upstream_substituters" ];
  configFile = toml.generate "builder.toml" (common.withoutNulls (cfg.settings // {
    executor = if executor.kind == "noop" then removeAttrs executor nixOnlyKeys else executor;
  }));
  inherit (lib) mkOption types;
in
{
  options.services.drover.builder = {
    enable = lib.mkEnableOption "a drover builder";

    package = mkOption {
      type = types.package;
      description = "The drover package providing bin/drover-builder.";
    };

    settings = mkOption {
      description = ''
        The builder's configuration (builder.toml); `drover-builder --print-default-config`
        prints every key with its default. Keys not declared here are passed through.
      '';
      default = { };
      type = types.submodule {
        freeformType = toml.type;
        options = {
          runner.url = mkOption {
            type = types.str;
            example = "https://runner.example.org:7700";
            description = "The runner's gRPC endpoint.";
          };
          tls = {
            ca_certificate = common.runtimePath "PEM file of the farm's CA.";
            certificate = common.runtimePath "PEM file of this builder's certificate (role builder).";
            key = common.runtimePath "PEM file of this builder's key; read at run time, never copied into the store.";
          };
          builder = {
            systems = mkOption {
              type = types.listOf types.str;
              default = [ pkgs.stdenv.hostPlatform.system ];
              description = "Systems this builder builds for.";
            };
            max_jobs = mkOption {
              type = types.ints.positive;
              default = 1;
              description = "Steps at once.";
            };
            drain_deadline_secs = mkOption {
              type = types.ints.unsigned;
              default = 300;
              description = "How long a stop lets running steps finish before handing them back.";
            };
          };
          executor = {
            kind = mkOption {
              type = types.enum [ "nix" "noop" ];
              default = "nix";
              description = "Build with the local Nix, or build nothing (tests).";
            };
            store = mkOption {
              type = types.enum [ "daemon" "local" ];
              default = "daemon";
              description = ''
                daemon: steps build through the local nix-daemon, so builds run in the daemon's
                sandbox outside this unit and the unit keeps its hardening (NixOS's default).
                local: the builder opens the store itself (single-user Nix; builds then inherit
                this unit's restrictions, which break Nix's sandbox).
              '';
            };
            cache_url = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "http://runner.example.org:7701";
              description = "The farm's binary cache; required when kind = \"nix\".";
            };
            trusted_public_keys = mkOption {
              type = types.nullOr (types.listOf types.str);
              default = null;
              description = ''
                The farm cache's public key, and those of the upstream caches; required when
                kind = "nix".
              '';
            };
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = map
      (key: {
        assertion = executor.kind != "nix" || executor.${key} != null;
        message = "services.drover.builder.settings.executor.${key} must be set when executor.kind = \"nix\".";
      }) [ "cache_url" "trusted_public_keys" ];

    nix.settings.trusted-users = [ "root" ];

    systemd.services.drover-builder = {
      description = "drover builder (runs build steps for the queue runner)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      requires = lib.optional daemon "nix-daemon.socket";
      after = [ "network-online.target" ]
        ++ lib.optionals daemon [ "nix-daemon.socket" "nix-daemon.service" ];
      path = [ config.nix.package pkgs.util-linux pkgs.coreutils ];
      serviceConfig = common.hardening // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${cfg.package}/bin/drover-builder --config ${configFile}";
        User = "root";
        StateDirectory = "drover-builder";
        Restart = "on-failure";
        RestartSec = "5s";
        RestartPreventExitStatus = 78;
        WatchdogSec = "120s";
        # SIGTERM drains; only the builder gets it, and it stops its builds itself.
        KillMode = "mixed";
        TimeoutStopSec = "${toString (cfg.settings.builder.drain_deadline_secs + 30)}s";
        # The daemon writes the store; the builder only pins outputs with roots under drover/.
        ReadWritePaths = storeAccess;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        SystemCallArchitectures = "native";
        UMask = "0022";
      } // lib.optionalAttrs daemon {
        # The daemon builds; the builder needs only CAP_SYS_ADMIN, for the PID namespace of
        # each serve process.
        CapabilityBoundingSet = [ "CAP_SYS_ADMIN" ];
      };
    };
  };
}
