# services.drover.builder: a drover builder as a systemd service (Type=notify, watchdog, drain on
# stop), its configuration generated from typed options with the TOML generator, its key read
# from a path at run time. The builder runs as root (each build gets a PID namespace of its own,
# and it adds paths to the Nix store), which the module makes a Nix trusted user explicitly.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.drover.builder;
  common = import ./common.nix { inherit lib; };
  toml = pkgs.formats.toml { };
  configFile = toml.generate "builder.toml" cfg.settings;
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
            cache_url = mkOption {
              type = types.str;
              example = "http://runner.example.org:7701";
              description = "The farm's binary cache.";
            };
            trusted_public_keys = mkOption {
              type = types.listOf types.str;
              description = "The farm cache's public key, and those of the upstream caches.";
            };
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    nix.settings.trusted-users = [ "root" ];

    systemd.services.drover-builder = {
      description = "drover builder (runs build steps for the queue runner)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" "nix-daemon.service" ];
      path = [ config.nix.package pkgs.util-linux pkgs.coreutils ];
      serviceConfig = common.hardening // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${cfg.package}/bin/drover-builder --config ${configFile}";
        User = "root";
        StateDirectory = "drover-builder";
        CacheDirectory = "drover-builder";
        Restart = "on-failure";
        RestartSec = "5s";
        RestartPreventExitStatus = 78;
        WatchdogSec = "120s";
        # SIGTERM drains; only the builder gets it, and it stops its builds itself.
        KillMode = "mixed";
        TimeoutStopSec = "${toString (cfg.settings.builder.drain_deadline_secs + 30)}s";
        ReadWritePaths = [ "/nix" ];
        UMask = "0022";
      };
    };
  };
}
