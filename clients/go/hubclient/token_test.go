package hubclient_test

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"testing"

	"github.com/remoteingress/remoteingress/clients/go/hubclient"
)

// repoRoot is the repository root, found from this file's location.
func repoRoot(t *testing.T) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the test file")
	}
	return filepath.Join(filepath.Dir(file), "..", "..", "..")
}

type tokenFields struct {
	HubHost string   `json:"hubHost"`
	HubPort uint16   `json:"hubPort"`
	EdgeID  string   `json:"edgeId"`
	Secret  string   `json:"secret"`
	Pin     string   `json:"pin"`
	Hubs    []string `json:"hubs"`
}

func (f tokenFields) token() hubclient.ConnectionToken {
	return hubclient.ConnectionToken{HubHost: f.HubHost, HubPort: f.HubPort, EdgeID: f.EdgeID, Secret: f.Secret, Pin: f.Pin, Hubs: f.Hubs}
}

type vectors struct {
	Tokens []struct {
		Name   string      `json:"name"`
		Fields tokenFields `json:"fields"`
		Token  string      `json:"token"`
	} `json:"tokens"`
	DecodeOnly []struct {
		Name   string      `json:"name"`
		Fields tokenFields `json:"fields"`
		Token  string      `json:"token"`
	} `json:"decodeOnly"`
	InvalidTokens []struct {
		Name  string `json:"name"`
		Token string `json:"token"`
		Error string `json:"error"`
	} `json:"invalidTokens"`
	Edges []struct {
		Name  string          `json:"name"`
		Edge  json.RawMessage `json:"edge"`
		Valid bool            `json:"valid"`
		Field string          `json:"field"`
	} `json:"edges"`
}

// loadVectors reads the test vectors shared with the Rust and TypeScript tests.
func loadVectors(t *testing.T) vectors {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot(t), "testdata", "vectors.json"))
	if err != nil {
		t.Fatal(err)
	}
	var v vectors
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatal(err)
	}
	if len(v.Tokens) == 0 || len(v.InvalidTokens) == 0 || len(v.Edges) == 0 {
		t.Fatal("the vectors file has no cases")
	}
	return v
}

func TestTokensMatchTheSharedVectors(t *testing.T) {
	v := loadVectors(t)
	for _, c := range v.Tokens {
		encoded, err := c.Fields.token().Encode()
		if err != nil || encoded != c.Token {
			t.Errorf("%s: encoded %q, %v; want %q", c.Name, encoded, err, c.Token)
		}
		decoded, err := hubclient.DecodeConnectionToken(c.Token)
		if err != nil || !reflect.DeepEqual(decoded, c.Fields.token()) {
			t.Errorf("%s: decoded %+v, %v", c.Name, decoded, err)
		}
	}
	for _, c := range v.DecodeOnly {
		decoded, err := hubclient.DecodeConnectionToken(c.Token)
		if err != nil || !reflect.DeepEqual(decoded, c.Fields.token()) {
			t.Errorf("%s: decoded %+v, %v", c.Name, decoded, err)
		}
	}
}

func TestInvalidTokensFailWithTheSharedKind(t *testing.T) {
	kinds := map[string]error{
		"tooLong": hubclient.ErrTokenTooLong,
		"base64":  hubclient.ErrTokenBase64,
		"json":    hubclient.ErrTokenJSON,
		"badPin":  hubclient.ErrBadPin,
	}
	for _, c := range loadVectors(t).InvalidTokens {
		_, err := hubclient.DecodeConnectionToken(c.Token)
		if !errors.Is(err, kinds[c.Error]) {
			t.Errorf("%s: got %v, want %s", c.Name, err, c.Error)
		}
	}
}

func TestEncodeRefusesABadPin(t *testing.T) {
	_, err := hubclient.ConnectionToken{HubHost: "h", HubPort: 1, EdgeID: "e", Secret: "s", Pin: "xyz"}.Encode()
	if !errors.Is(err, hubclient.ErrBadPin) {
		t.Fatalf("got %v", err)
	}
}
