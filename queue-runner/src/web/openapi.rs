//! The API's OpenAPI 3.1 description, served at `/api/v1/openapi.json`: the operations from one
//! table ([`OPERATIONS`]), which a test holds to the router's routes, and a schema for every
//! message from the protocol's own descriptors, as the protobuf JSON mapping writes it (field
//! names as in the .proto files, 64-bit integers as strings, enums by name, bytes as base64).

use axum::Json;
use drover_proto::FILE_DESCRIPTOR_SET;
use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Value, json};

/// What an operation answers with.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// A message, as JSON.
    Json(&'static str),
    /// Server-sent events with these names.
    Events(&'static [&'static str]),
    /// This document.
    Document,
    /// A JSON object that is no message of the protocol, described here.
    Object(&'static str),
    /// A page of the status site, or one of its files, of this content type.
    Page(&'static str),
}

/// One operation of the API.
#[derive(Debug, Clone, Copy)]
pub struct Operation {
    /// Its path, with `{id}` for a build id.
    pub path: &'static str,
    /// Its method, lower case.
    pub method: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// Its query parameters.
    pub query: &'static [(&'static str, &'static str)],
    /// The message its body is, if it has one.
    pub body: Option<&'static str>,
    /// What it answers with.
    pub answer: Answer,
}

const DRV_PATH: &[(&str, &str)] = &[("drv_path", "the step's derivation, /nix/store/….drv")];

/// Every operation, in the order `docs/web.md` lists them.
pub const OPERATIONS: &[Operation] = &[
    Operation {
        path: "/api/v1/builds",
        method: "post",
        summary: "Submit a build (its derivations as base64)",
        query: &[],
        body: Some("SubmitRequest"),
        answer: Answer::Json("SubmitResponse"),
    },
    Operation {
        path: "/api/v1/builds",
        method: "get",
        summary: "List builds, newest first, a page at a time",
        query: &[
            (
                "status",
                "a build status (queued, failed, …); repeat for several",
            ),
            (
                "metadata.KEY",
                "only builds whose metadata KEY has this value",
            ),
            ("submitted_after_ms", "Unix milliseconds"),
            ("submitted_before_ms", "Unix milliseconds"),
            ("page_size", "1 to 1000; default 100"),
            ("page_token", "next_page_token of the previous page"),
        ],
        body: None,
        answer: Answer::Json("ListResponse"),
    },
    Operation {
        path: "/api/v1/builds/{id}",
        method: "get",
        summary: "A build's whole state: steps, why each waits, outputs, predicted end",
        query: &[],
        body: None,
        answer: Answer::Json("GetResponse"),
    },
    Operation {
        path: "/api/v1/builds/{id}/cancel",
        method: "post",
        summary: "Cancel a build (its submitter or an admin)",
        query: &[],
        body: None,
        answer: Answer::Json("CancelResponse"),
    },
    Operation {
        path: "/api/v1/builds/{id}/restart",
        method: "post",
        summary: "Queue a failed or cancelled build again",
        query: &[("dependents", "true: also the builds its failure ended")],
        body: None,
        answer: Answer::Json("RestartResponse"),
    },
    Operation {
        path: "/api/v1/builds/{id}/events",
        method: "get",
        summary: "Watch a build: its state, then each change, with heartbeats",
        query: &[],
        body: None,
        answer: Answer::Events(&["state", "step", "build", "estimate", "heartbeat", "error"]),
    },
    Operation {
        path: "/api/v1/logs",
        method: "get",
        summary: "The log of a step's latest attempt (base64), so far if it runs",
        query: DRV_PATH,
        body: None,
        answer: Answer::Json("GetLogResponse"),
    },
    Operation {
        path: "/api/v1/logs/events",
        method: "get",
        summary: "Follow a step's log: what it has, then each line as it comes, with heartbeats",
        query: DRV_PATH,
        body: None,
        answer: Answer::Events(&["log", "heartbeat", "error"]),
    },
    Operation {
        path: "/api/v1/derivations",
        method: "post",
        summary: "Stage derivations (and input sources) for a job set",
        query: &[],
        body: Some("StageDerivationsRequest"),
        answer: Answer::Json("StageDerivationsResponse"),
    },
    Operation {
        path: "/api/v1/job-sets",
        method: "post",
        summary: "Queue one build per job of staged derivations, all or none",
        query: &[],
        body: Some("SubmitJobSetRequest"),
        answer: Answer::Json("SubmitJobSetResponse"),
    },
    Operation {
        path: "/api/v1/tokens",
        method: "post",
        summary: "Create an API token (admins); its secret is in the answer, once",
        query: &[],
        body: Some("CreateTokenRequest"),
        answer: Answer::Json("CreateTokenResponse"),
    },
    Operation {
        path: "/api/v1/tokens",
        method: "get",
        summary: "List the API tokens, revoked ones too, without their secrets (admins)",
        query: &[],
        body: None,
        answer: Answer::Json("ListTokensResponse"),
    },
    Operation {
        path: "/api/v1/tokens/{name}/revoke",
        method: "post",
        summary: "Revoke an API token by name (admins): its requests and streams end at once",
        query: &[],
        body: None,
        answer: Answer::Object("{}"),
    },
    Operation {
        path: "/api/v1/openapi.json",
        method: "get",
        summary: "This description",
        query: &[],
        body: None,
        answer: Answer::Document,
    },
    Operation {
        path: "/api/v1/status",
        method: "get",
        summary: "The farm at a glance, as the status page shows it",
        query: &[],
        body: None,
        answer: Answer::Object(
            "queues (system, status, steps), builders (name, state, systems, max_jobs, \
             running, running_steps, quarantine_reason), running (step_id, drv_path, machine, \
             started_at_ms), recent builds (id, status, drv_path, submitted_at_ms), now_ms",
        ),
    },
    Operation {
        path: "/api/v1/status/events",
        method: "get",
        summary: "The farm at a glance, now and every 2 s",
        query: &[],
        body: None,
        answer: Answer::Events(&["overview"]),
    },
    Operation {
        path: "/",
        method: "get",
        summary: "The status page: queues, builders, running steps, recent builds",
        query: &[],
        body: None,
        answer: Answer::Page("text/html"),
    },
    Operation {
        path: "/builds/{id}",
        method: "get",
        summary: "A build's page: its steps, why each waits, its predicted end, a live log",
        query: &[],
        body: None,
        answer: Answer::Page("text/html"),
    },
    Operation {
        path: "/login",
        method: "get",
        summary: "The status page's login form",
        query: &[],
        body: None,
        answer: Answer::Page("text/html"),
    },
    Operation {
        path: "/login",
        method: "post",
        summary: "Sign in with an API token (form field token): sets the drover_token cookie",
        query: &[],
        body: None,
        answer: Answer::Page("text/html"),
    },
    Operation {
        path: "/status/app.js",
        method: "get",
        summary: "The status page's script",
        query: &[],
        body: None,
        answer: Answer::Page("text/javascript"),
    },
    Operation {
        path: "/status/style.css",
        method: "get",
        summary: "The status page's style sheet",
        query: &[],
        body: None,
        answer: Answer::Page("text/css"),
    },
];

/// `GET /api/v1/openapi.json`.
pub async fn serve() -> Json<Value> {
    Json(document())
}

/// The whole description.
#[must_use]
pub fn document() -> Value {
    let mut paths = Map::new();
    for operation in OPERATIONS {
        let entry = paths
            .entry(operation.path)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(methods) = entry {
            methods.insert(operation.method.to_owned(), describe(operation));
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "drover",
            "version": drover_proto::API_VERSION,
            "description": "The build API of a drover farm as JSON (the protobuf JSON mapping of \
                            drover.v1), with server-sent events. Authenticate with a client \
                            certificate of the farm or an API token (docs/web.md).",
        },
        "security": [{ "token": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "token": { "type": "http", "scheme": "bearer" },
            },
            "schemas": schemas(),
        },
    })
}

fn describe(operation: &Operation) -> Value {
    let mut parameters: Vec<Value> = operation
        .query
        .iter()
        .map(|(name, description)| {
            json!({ "name": name, "in": "query", "description": description,
                    "schema": { "type": "string" } })
        })
        .collect();
    if operation.path.contains("{id}") {
        parameters.push(json!({ "name": "id", "in": "path", "required": true,
                                "description": "the build id",
                                "schema": { "type": "integer", "format": "int64" } }));
    }
    if operation.path.contains("{name}") {
        parameters.push(json!({ "name": "name", "in": "path", "required": true,
                                "description": "the token's name",
                                "schema": { "type": "string" } }));
    }
    let ok = match operation.answer {
        Answer::Json(message) => json!({ "description": message,
            "content": { "application/json": { "schema": reference(message) } } }),
        Answer::Events(names) => json!({
            "description": format!("server-sent events: {}", names.join(", ")),
            "content": { "text/event-stream": { "schema": { "type": "string" } } } }),
        Answer::Document => json!({ "description": "OpenAPI 3.1",
            "content": { "application/json": { "schema": { "type": "object" } } } }),
        Answer::Object(fields) => json!({ "description": fields,
            "content": { "application/json": { "schema": { "type": "object" } } } }),
        Answer::Page(content_type) => json!({ "description": content_type,
            "content": { content_type: { "schema": { "type": "string" } } } }),
    };
    let mut described = json!({
        "summary": operation.summary,
        "parameters": parameters,
        "responses": {
            "200": ok,
            "default": { "description": "an error: {\"error\": {\"code\", \"message\"}}" },
        },
    });
    if let Some(body) = operation.body {
        described["requestBody"] = json!({ "required": true,
            "content": { "application/json": { "schema": reference(body) } } });
    }
    described
}

fn reference(message: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{message}") })
}

/// A schema for every message and enum of drover.v1.
fn schemas() -> Map<String, Value> {
    let mut schemas = Map::new();
    let Ok(set) = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET) else {
        return schemas;
    };
    for file in &set.file {
        for enumeration in &file.enum_type {
            schemas.insert(enumeration.name().to_owned(), enum_schema(enumeration));
        }
        for message in &file.message_type {
            add_message(&mut schemas, "", message);
        }
    }
    schemas
}

fn enum_schema(enumeration: &prost_types::EnumDescriptorProto) -> Value {
    let names: Vec<&str> = enumeration
        .value
        .iter()
        .map(prost_types::EnumValueDescriptorProto::name)
        .collect();
    json!({ "type": "string", "enum": names })
}

/// Adds `message` (and the messages and enums nested in it, named `Outer.Inner`).
fn add_message(schemas: &mut Map<String, Value>, prefix: &str, message: &DescriptorProto) {
    let name = format!("{prefix}{}", message.name());
    for nested in &message.nested_type {
        if !is_map_entry(nested) {
            add_message(schemas, &format!("{name}."), nested);
        }
    }
    for enumeration in &message.enum_type {
        schemas.insert(
            format!("{name}.{}", enumeration.name()),
            enum_schema(enumeration),
        );
    }
    let properties: Map<String, Value> = message
        .field
        .iter()
        .map(|field| (field.name().to_owned(), field_schema(message, field)))
        .collect();
    schemas.insert(name, json!({ "type": "object", "properties": properties }));
}

fn field_schema(message: &DescriptorProto, field: &FieldDescriptorProto) -> Value {
    let map_entry = message.nested_type.iter().find(|nested| {
        is_map_entry(nested) && field.type_name().ends_with(&format!(".{}", nested.name()))
    });
    if let Some(entry) = map_entry {
        let value = entry.field.iter().find(|field| field.name() == "value");
        let value = value.map_or_else(|| json!({}), |value| field_schema(entry, value));
        return json!({ "type": "object", "additionalProperties": value });
    }
    let single = match field.r#type() {
        Type::Int64 | Type::Uint64 | Type::Sint64 | Type::Fixed64 | Type::Sfixed64 => {
            json!({ "type": "string", "format": "int64" })
        }
        Type::Int32 | Type::Uint32 | Type::Sint32 | Type::Fixed32 | Type::Sfixed32 => {
            json!({ "type": "integer" })
        }
        Type::Double | Type::Float => json!({ "type": "number" }),
        Type::Bool => json!({ "type": "boolean" }),
        Type::String => json!({ "type": "string" }),
        Type::Bytes => json!({ "type": "string", "contentEncoding": "base64" }),
        Type::Enum | Type::Message | Type::Group => {
            reference(field.type_name().trim_start_matches(".drover.v1."))
        }
    };
    if field.label() == Label::Repeated {
        json!({ "type": "array", "items": single })
    } else {
        single
    }
}

/// Whether `message` is the entry type protoc makes for a map field.
fn is_map_entry(message: &DescriptorProto) -> bool {
    message
        .options
        .as_ref()
        .is_some_and(prost_types::MessageOptions::map_entry)
}
