package hubclient

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// ConnectionToken is everything an edge needs to reach its hub, as carried by the token string
// that `remoteingress edge --token` takes. Encode and DecodeConnectionToken produce and accept
// exactly the Rust CLI's tokens.
type ConnectionToken struct {
	// HubHost is the hub's host name or address.
	HubHost string
	// HubPort is the hub's tunnel port.
	HubPort uint16
	// EdgeID is the edge's id.
	EdgeID string
	// Secret is the edge's secret.
	Secret string
	// Pin is the SHA-256 of the hub's certificate in lowercase hex; empty for none.
	Pin string
	// Hubs are further hubs of the same tier, "host:port", besides HubHost:HubPort.
	Hubs []string
}

// MaxTokenLen is the longest token accepted.
const MaxTokenLen = 16 * 1024

// Token errors, to compare with errors.Is.
var (
	// ErrTokenTooLong: longer than MaxTokenLen.
	ErrTokenTooLong = errors.New("token is longer than 16384 characters")
	// ErrTokenBase64: not base64url.
	ErrTokenBase64 = errors.New("token is not base64url")
	// ErrTokenJSON: not the expected JSON.
	ErrTokenJSON = errors.New("token does not hold connection details")
	// ErrBadPin: the pin is not 64 hex digits.
	ErrBadPin = errors.New("token pin must be 64 hex digits (SHA-256)")
)

// NormalizePin checks that pin is a SHA-256 in hex (colons allowed) and returns it in lowercase.
func NormalizePin(pin string) (string, error) {
	pin = strings.ReplaceAll(pin, ":", "")
	if len(pin) != 64 {
		return "", ErrBadPin
	}
	for _, c := range []byte(pin) {
		if !strings.ContainsRune("0123456789abcdefABCDEF", rune(c)) {
			return "", ErrBadPin
		}
	}
	return strings.ToLower(pin), nil
}

// Encode returns the token string: base64url without padding of the compact JSON
// {"h":host,"p":port,"e":edgeId,"s":secret[,"f":pin][,"hubs":[...]]}. A pin that is not a
// SHA-256 is an error.
func (t ConnectionToken) Encode() (string, error) {
	var buf bytes.Buffer
	buf.WriteString(`{"h":`)
	writeJSONString(&buf, t.HubHost)
	buf.WriteString(`,"p":` + strconv.Itoa(int(t.HubPort)) + `,"e":`)
	writeJSONString(&buf, t.EdgeID)
	buf.WriteString(`,"s":`)
	writeJSONString(&buf, t.Secret)
	if t.Pin != "" {
		pin, err := NormalizePin(t.Pin)
		if err != nil {
			return "", err
		}
		buf.WriteString(`,"f":`)
		writeJSONString(&buf, pin)
	}
	if len(t.Hubs) > 0 {
		buf.WriteString(`,"hubs":[`)
		for i, hub := range t.Hubs {
			if i > 0 {
				buf.WriteByte(',')
			}
			writeJSONString(&buf, hub)
		}
		buf.WriteString("]")
	}
	buf.WriteString("}")
	return base64.RawURLEncoding.EncodeToString(buf.Bytes()), nil
}

// writeJSONString writes s as a JSON string escaped exactly as the Rust CLI (serde_json) and
// JSON.stringify do: quote, backslash and control characters only; no HTML or U+2028 escapes.
func writeJSONString(buf *bytes.Buffer, s string) {
	const hex = "0123456789abcdef"
	buf.WriteByte('"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"':
			buf.WriteString(`\"`)
		case c == '\\':
			buf.WriteString(`\\`)
		case c == '\b':
			buf.WriteString(`\b`)
		case c == '\f':
			buf.WriteString(`\f`)
		case c == '\n':
			buf.WriteString(`\n`)
		case c == '\r':
			buf.WriteString(`\r`)
		case c == '\t':
			buf.WriteString(`\t`)
		case c < 0x20:
			buf.WriteString(`\u00`)
			buf.WriteByte(hex[c>>4])
			buf.WriteByte(hex[c&0xf])
		default:
			buf.WriteByte(c)
		}
	}
	buf.WriteByte('"')
}

// DecodeConnectionToken parses a token; surrounding whitespace and base64 padding are tolerated
// and the pin comes back in lowercase. Errors wrap ErrTokenTooLong, ErrTokenBase64, ErrTokenJSON
// or ErrBadPin.
func DecodeConnectionToken(token string) (ConnectionToken, error) {
	token = strings.TrimSpace(token)
	if len(token) > MaxTokenLen {
		return ConnectionToken{}, ErrTokenTooLong
	}
	encoding := base64.RawURLEncoding
	if strings.HasSuffix(token, "=") {
		encoding = base64.URLEncoding
	}
	raw, err := encoding.Strict().DecodeString(token)
	if err != nil {
		return ConnectionToken{}, fmt.Errorf("%w: %v", ErrTokenBase64, err)
	}
	if !utf8.Valid(raw) {
		return ConnectionToken{}, fmt.Errorf("%w: not UTF-8", ErrTokenJSON)
	}
	// Keys are matched exactly (encoding/json alone would also accept "H" for "h").
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return ConnectionToken{}, fmt.Errorf("%w: %v", ErrTokenJSON, err)
	}
	var decoded ConnectionToken
	var pin *string
	for key, target := range map[string]any{"h": &decoded.HubHost, "p": &decoded.HubPort, "e": &decoded.EdgeID, "s": &decoded.Secret, "f": &pin} {
		value, ok := fields[key]
		if !ok {
			if key == "f" {
				continue
			}
			return ConnectionToken{}, fmt.Errorf("%w: missing field %q", ErrTokenJSON, key)
		}
		if key != "f" && string(value) == "null" {
			return ConnectionToken{}, fmt.Errorf("%w: field %q is null", ErrTokenJSON, key)
		}
		if err := json.Unmarshal(value, target); err != nil {
			return ConnectionToken{}, fmt.Errorf("%w: field %q: %v", ErrTokenJSON, key, err)
		}
	}
	if pin != nil {
		if decoded.Pin, err = NormalizePin(*pin); err != nil {
			return ConnectionToken{}, err
		}
	}
	if hubs, ok := fields["hubs"]; ok && string(hubs) != "null" {
		if err := json.Unmarshal(hubs, &decoded.Hubs); err != nil {
			return ConnectionToken{}, fmt.Errorf("%w: field \"hubs\": %v", ErrTokenJSON, err)
		}
	}
	return decoded, nil
}
