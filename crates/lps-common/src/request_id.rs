//! The `Request-Id` header: a decimal integer string carried across every hop.

use std::fmt;

use http::{HeaderMap, HeaderName};

use crate::api::ApiError;

/// The header that carries the request id on every HTTP hop.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// Longest accepted id: upstream uses `uuid1().int`, at most 39 decimal digits.
pub const MAX_DIGITS: usize = 39;

/// A validated request id: 1 to 39 ASCII digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(String);

impl RequestId {
    /// A new id: a time-ordered UUID (v7) as a decimal integer, like upstream's
    /// `uuid1().int`.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().as_u128().to_string())
    }

    /// Validates `value` as a decimal id.
    pub fn parse(value: &str) -> Result<Self, ApiError> {
        if value.is_empty()
            || value.len() > MAX_DIGITS
            || !value.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(ApiError::bad_request(
                "invalid_request_id",
                format!("Request-Id must be a decimal integer of 1 to {MAX_DIGITS} digits"),
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// The id from the `Request-Id` header, or a new one when it is missing.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        match headers.get(&REQUEST_ID) {
            None => Ok(Self::generate()),
            Some(value) => Self::parse(value.to_str().map_err(|_| {
                ApiError::bad_request("invalid_request_id", "Request-Id is not ASCII")
            })?),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_decimal_and_distinct() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_ne!(a, b);
        assert!(RequestId::parse(a.as_str()).is_ok());
    }

    #[test]
    fn header_is_kept_verbatim_or_generated() {
        let mut headers = HeaderMap::new();
        assert!(
            !RequestId::from_headers(&headers)
                .unwrap()
                .as_str()
                .is_empty()
        );
        headers.insert(REQUEST_ID, "42".parse().unwrap());
        assert_eq!(RequestId::from_headers(&headers).unwrap().as_str(), "42");
        headers.insert(REQUEST_ID, "abc".parse().unwrap());
        assert_eq!(
            RequestId::from_headers(&headers).unwrap_err().status,
            http::StatusCode::BAD_REQUEST
        );
        let too_long = "1".repeat(MAX_DIGITS + 1);
        assert!(RequestId::parse(&too_long).is_err());
        assert!(RequestId::parse(&"9".repeat(MAX_DIGITS)).is_ok());
    }
}
