# Evaluates drover's NixOS modules with nixpkgs' module system for a few configurations and returns
# what each one produces, as JSON for test-support/tests/nixos_modules.rs: the systemd units, the
# settings each unit's TOML file is generated from, users, groups, PostgreSQL, firewall ports, Nix
# settings and the messages of failed assertions.
#
# nixpkgs' lib has no NixOS options, so the few the modules set are declared here as stubs typed
# like NixOS's (lists concatenate, unit options merge as NixOS merges them), and pkgs is a stub
# too: evaluation needs no network and writes nothing to the store. The stub TOML generator
# returns a fake store path followed by the settings as JSON on lines of their own; `unit` below
# splits them off again, so a test sees exactly what a module would write and that ExecStart
# passes that file.
#
#   nix-instantiate --eval --strict --json nixos-modules/tests/eval.nix \
#     --arg lib 'import /path/to/nixpkgs/lib'
{ lib }:
let
  inherit (lib) mkOption types;

  stubPackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };

  drover = stubPackage "drover";

  # nixpkgs' formats.toml type, and a generator that writes nothing.
  tomlValue = types.oneOf [
    types.bool
    types.int
    types.float
    types.str
    types.path
    (types.attrsOf tomlValue)
    (types.listOf tomlValue)
  ] // { description = "TOML value"; };

  pkgs = {
    coreutils = stubPackage "coreutils";
    util-linux = stubPackage "util-linux";
    nix = stubPackage "nix";
    stdenv.hostPlatform.system = "x86_64-linux";
    formats.toml = { }: {
      type = tomlValue;
      generate = name: value:
        "/nix/store/00000000000000000000000000000000-${name}\n${builtins.toJSON value}\n";
    };
  };

  # NixOS's unitOption: lists concatenate, other values must agree.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      if lib.any (def: lib.isList def.value) defs
      then lib.concatMap (def: lib.toList def.value) defs
      else lib.mergeEqualOption loc defs;
  };

  freeform = types.submodule { freeformType = types.attrsOf types.anything; };

  unitNames = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };

  stubs = {
    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      systemd.services = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          options = {
            description = mkOption {
              type = types.str;
              default = "";
            };
            wantedBy = unitNames;
            wants = unitNames;
            after = unitNames;
            requires = unitNames;
            path = mkOption {
              type = types.listOf (types.either types.package types.str);
              default = [ ];
            };
            environment = mkOption {
              type = types.attrsOf types.str;
              default = { };
            };
            serviceConfig = mkOption {
              type = types.attrsOf unitOption;
              default = { };
            };
          };
        });
      };
      users.users = mkOption {
        type = types.attrsOf freeform;
        default = { };
      };
      users.groups = mkOption {
        type = types.attrsOf freeform;
        default = { };
      };
      services.postgresql = mkOption {
        type = freeform;
        default = { };
      };
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      nix.package = mkOption {
        type = types.package;
        default = pkgs.nix;
      };
      nix.settings = mkOption {
        default = { };
        type = types.submodule {
          freeformType = types.attrsOf types.anything;
          options.trusted-users = mkOption {
            type = types.listOf types.str;
            default = [ ];
          };
        };
      };
    };
  };

  # A unit as JSON: store paths as strings, the generated settings split off ExecStart.
  unit = service:
    let
      parts = lib.splitString "\n" service.serviceConfig.ExecStart;
      generated = builtins.length parts == 3;
    in
    {
      inherit (service) description wantedBy wants after requires environment;
      path = map toString service.path;
      serviceConfig = service.serviceConfig // lib.optionalAttrs generated {
        ExecStart = lib.head parts + lib.last parts;
      };
      settings = if generated then builtins.fromJSON (builtins.elemAt parts 1) else null;
    };

  evaluate = modules:
    let
      inherit (lib.evalModules {
        modules = [ ../default.nix stubs { _module.args.pkgs = pkgs; } ] ++ modules;
      }) config;
    in
    {
      units = lib.mapAttrs (_: unit) config.systemd.services;
      users = config.users.users;
      groups = config.users.groups;
      postgresql = config.services.postgresql;
      allowedTCPPorts = config.networking.firewall.allowedTCPPorts;
      trustedUsers = config.nix.settings.trusted-users;
      failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
    };

  runner = {
    services.drover.queue-runner = {
      enable = true;
      package = drover;
      settings = {
        tls = {
          ca_certificate = "/run/keys/drover/ca.pem";
          certificate = "/run/keys/drover/runner.pem";
          key = "/run/keys/drover/runner-key.pem";
        };
        cache.secret_key_file = "/run/keys/drover/cache-key";
      };
    };
  };

  remoteDatabase = {
    services.drover.queue-runner = {
      createLocalDatabase = false;
      secretsGroup = null;
      openFirewall = true;
      settings.database = {
        url = "host=db.example.org dbname=drover user=drover";
        password_file = "/run/keys/drover/database-password";
        ssl_mode = "verify-full";
        ssl_root_certificate = "/run/keys/drover/postgresql-ca.pem";
      };
    };
  };

  builder = {
    services.drover.builder = {
      enable = true;
      package = drover;
      settings = {
        runner.url = "https://runner.example.org:7700";
        tls = {
          ca_certificate = "/run/keys/drover/ca.pem";
          certificate = "/run/keys/drover/builder.pem";
          key = "/run/keys/drover/builder-key.pem";
        };
      };
    };
  };

  executor = settings: { services.drover.builder.settings.executor = settings; };

  nixExecutor = executor {
    cache_url = "http://runner.example.org:7701";
    trusted_public_keys = [ "runner.example.org-1:AAAA" ];
    upstream_substituters = [ "https://cache.nixos.org" ];
  };
in
{
  runnerDefaults = evaluate [ runner ];
  runnerRemoteDatabase = evaluate [ runner remoteDatabase ];
  runnerVerifyFullWithoutRootCertificate = evaluate [
    runner
    { services.drover.queue-runner.settings.database.ssl_mode = "verify-full"; }
  ];
  builderDaemon = evaluate [ builder nixExecutor ];
  builderLocal = evaluate [ builder nixExecutor (executor { store = "local"; }) ];
  # upstream_substituters is left from a Nix executor: the module must drop it.
  builderNoop = evaluate [
    builder
    (executor {
      kind = "noop";
      build_ms = 100;
      upstream_substituters = [ "https://cache.nixos.org" ];
    })
  ];
  builderNixWithoutCacheUrl = evaluate [
    builder
    (executor { trusted_public_keys = [ "runner.example.org-1:AAAA" ]; })
  ];
}
