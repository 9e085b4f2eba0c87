# services.drover.queue-runner: drover's queue runner as a hardened systemd service (Type=notify,
# watchdog, reload on SIGHUP), its configuration generated from typed options with the TOML
# generator, secrets read from paths at run time (never copied into the store), and optionally a
# local PostgreSQL database and role.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.drover.queue-runner;
  common = import ./common.nix { inherit lib; };
  toml = pkgs.formats.toml { };
  configFile = toml.generate "queue-runner.toml" cfg.settings;
  inherit (lib) mkOption types;
  secretPath = common.runtimePath;
in
{
  options.services.drover.queue-runner = {
    enable = lib.mkEnableOption "the drover queue runner";

    package = mkOption {
      type = types.package;
      description = "The drover package providing bin/drover-queue-runner.";
    };

    createLocalDatabase = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Create a local PostgreSQL database and role named "drover", owned by the service's
        user, reached over the Unix socket with peer authentication.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the gRPC and binary cache ports in the firewall.";
    };

    settings = mkOption {
      description = ''
        The runner's configuration (queue-runner.toml); `drover-queue-runner
        --print-default-config` prints every key with its default. Keys not declared here are
        passed through as they are.
      '';
      default = { };
      type = types.submodule {
        freeformType = toml.type;
        options = {
          database.url = mkOption {
            type = types.str;
            default = "host=/run/postgresql dbname=drover user=drover";
            description = "libpq connection string.";
          };
          grpc.listen = mkOption {
            type = types.str;
            default = "0.0.0.0:7700";
            description = "Address of the mTLS gRPC server (builders and clients).";
          };
          tls = {
            ca_certificate = secretPath "PEM file of the farm's CA.";
            certificate = secretPath "PEM file of the runner's certificate (role runner).";
            key = secretPath "PEM file of the runner's private key; read at run time, never copied into the store.";
          };
          logs.directory = mkOption {
            type = types.str;
            default = "/var/log/drover";
            description = "Where step logs are stored.";
          };
          cache = {
            directory = mkOption {
              type = types.str;
              default = "/var/lib/drover/cache";
              description = "The binary cache's directory.";
            };
            listen = mkOption {
              type = types.str;
              default = "0.0.0.0:7701";
              description = "Address of the binary cache (plain HTTP), /healthz and /readyz.";
            };
            secret_key_file = secretPath "The cache's signing key (nix-store --generate-binary-cache-key); read at run time.";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    users.users.drover = {
      isSystemUser = true;
      group = "drover";
      home = "/var/lib/drover";
    };
    users.groups.drover = { };

    services.postgresql = lib.mkIf cfg.createLocalDatabase {
      enable = true;
      ensureDatabases = [ "drover" ];
      ensureUsers = [{
        name = "drover";
        ensureDBOwnership = true;
      }];
    };

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [
      (common.portOf cfg.settings.grpc.listen)
      (common.portOf cfg.settings.cache.listen)
    ];

    systemd.services.drover-queue-runner = {
      description = "drover queue runner (build queue, scheduler, binary cache)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ]
        ++ lib.optional cfg.createLocalDatabase "postgresql.service";
      requires = lib.optional cfg.createLocalDatabase "postgresql.service";
      environment.MALLOC_ARENA_MAX = "2";
      serviceConfig = common.hardening // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${cfg.package}/bin/drover-queue-runner --config ${configFile} run";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        User = "drover";
        Group = "drover";
        StateDirectory = "drover";
        StateDirectoryMode = "0750";
        LogsDirectory = "drover";
        LogsDirectoryMode = "0750";
        Restart = "on-failure";
        RestartSec = "5s";
        RestartPreventExitStatus = 78;
        WatchdogSec = "60s";
        TimeoutStopSec = "60s";
        LimitNOFILE = 65536;
        PrivateDevices = true;
        ProtectProc = "invisible";
        RestrictNamespaces = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
        CapabilityBoundingSet = "";
        UMask = "0027";
      };
    };
  };
}
