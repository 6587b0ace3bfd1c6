//! A small JSON Schema validator for the subset docs/result-schema.json uses (type, enum,
//! required, properties, additionalProperties: false, minimum, pattern anchored digits, $ref into
//! $defs), so the schema file is tested against real records without a heavy dependency.

use serde_json::Value;

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        "null" => v.is_null(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "boolean" => v.is_boolean(),
        other => panic!("schema uses unsupported type {other}"),
    }
}

/// Errors of `value` against `schema` (`root` resolves `$ref`s); `at` is the JSON path so far.
pub fn validate(root: &Value, schema: &Value, value: &Value, at: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r
            .strip_prefix("#/$defs/")
            .expect("only #/$defs refs are supported");
        return validate(root, &root["$defs"][name], value, at);
    }
    if let Some(t) = schema.get("type") {
        let ok = match t {
            Value::String(t) => type_ok(t, value),
            Value::Array(ts) => ts.iter().any(|t| type_ok(t.as_str().unwrap(), value)),
            _ => panic!("bad type in schema at {at}"),
        };
        if !ok {
            errors.push(format!("{at}: type {t}, got {value}"));
            return errors;
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(value) {
            errors.push(format!("{at}: {value} not in {e:?}"));
        }
    }
    if let (Some(min), Some(x)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if x < min {
            errors.push(format!("{at}: {x} < minimum {min}"));
        }
    }
    if let (Some(_), Some(s)) = (schema.get("pattern"), value.as_str()) {
        // The only pattern in use is the RFC 3339 UTC timestamp.
        let shape: String = s
            .chars()
            .map(|c| if c.is_ascii_digit() { '9' } else { c })
            .collect();
        if shape != "9999-99-99T99:99:99Z" {
            errors.push(format!("{at}: {s} is not an RFC 3339 UTC time"));
        }
    }
    if let Some(obj) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let k = req.as_str().unwrap();
            if !obj.contains_key(k) {
                errors.push(format!("{at}: missing required {k}"));
            }
        }
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => errors.extend(validate(root, s, v, &format!("{at}.{k}"))),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{at}: unexpected property {k}"))
                }
                None => {}
            }
        }
    }
    errors
}
