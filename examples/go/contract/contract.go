// Package contract holds what both Go examples need: the broker connection
// from the environment and the mailbus single-object encoding.
package contract

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/hamba/avro/v2"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/scram"
)

// Env returns the variable's value, or def when it is unset or empty.
func Env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// Connection is the franz-go options every mailbus client needs: SCRAM-SHA-512,
// and TLS only when MAILBUS_SECURITY_PROTOCOL=SASL_SSL.
func Connection() ([]kgo.Opt, error) {
	password := os.Getenv("MAILBUS_PASSWORD")
	if file := os.Getenv("MAILBUS_PASSWORD_FILE"); file != "" {
		raw, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		password = strings.TrimSpace(string(raw))
	}
	opts := []kgo.Opt{
		kgo.SeedBrokers(strings.Split(Env("MAILBUS_BOOTSTRAP", "127.0.0.1:9092"), ",")...),
		kgo.SASL(scram.Auth{User: os.Getenv("MAILBUS_USERNAME"), Pass: password}.AsSha512Mechanism()),
	}
	switch protocol := Env("MAILBUS_SECURITY_PROTOCOL", "SASL_PLAINTEXT"); protocol {
	case "SASL_PLAINTEXT":
	case "SASL_SSL":
		config := &tls.Config{MinVersion: tls.VersionTLS12}
		if file := os.Getenv("MAILBUS_CA_FILE"); file != "" {
			pem, err := os.ReadFile(file)
			if err != nil {
				return nil, err
			}
			config.RootCAs = x509.NewCertPool()
			config.RootCAs.AppendCertsFromPEM(pem)
		}
		opts = append(opts, kgo.DialTLSConfig(config))
	default:
		return nil, fmt.Errorf("MAILBUS_SECURITY_PROTOCOL %q: use SASL_PLAINTEXT or SASL_SSL", protocol)
	}
	return opts, nil
}

// Schema is one version of a mailbus schema and the 10-byte header that
// starts every record written with it.
type Schema struct {
	Avro   avro.Schema
	Header []byte
}

// Load reads schemas/<topic>/v<version>.avsc under MAILBUS_SCHEMAS.
//
// hamba/avro keeps logicalType in its canonical form (the spec drops it), so
// its fingerprint of the file is not the one mailbus uses; the fingerprint
// is taken of a copy without logicalType, which has the spec's canonical form.
func Load(topic string, version int) (Schema, error) {
	path := filepath.Join(Env("MAILBUS_SCHEMAS", "../../schemas"), topic, fmt.Sprintf("v%d.avsc", version))
	raw, err := os.ReadFile(path)
	if err != nil {
		return Schema{}, err
	}
	schema, err := avro.ParseBytesWithCache(raw, "", &avro.SchemaCache{})
	if err != nil {
		return Schema{}, err
	}
	var tree any
	if err := json.Unmarshal(raw, &tree); err != nil {
		return Schema{}, err
	}
	plain, _ := json.Marshal(withoutLogicalTypes(tree))
	canonical, err := avro.ParseBytesWithCache(plain, "", &avro.SchemaCache{})
	if err != nil {
		return Schema{}, err
	}
	fingerprint, err := canonical.FingerprintUsing(avro.CRC64AvroLE)
	if err != nil {
		return Schema{}, err
	}
	return Schema{Avro: schema, Header: append([]byte{0xC3, 0x01}, fingerprint...)}, nil
}

func withoutLogicalTypes(node any) any {
	switch n := node.(type) {
	case map[string]any:
		delete(n, "logicalType")
		for key, child := range n {
			n[key] = withoutLogicalTypes(child)
		}
	case []any:
		for i, child := range n {
			n[i] = withoutLogicalTypes(child)
		}
	}
	return node
}

// Encode writes v single-object encoded: marker, fingerprint, Avro body.
func (s Schema) Encode(v any) ([]byte, error) {
	body, err := avro.Marshal(s.Avro, v)
	if err != nil {
		return nil, err
	}
	return append(append([]byte{}, s.Header...), body...), nil
}

// Decode reads a record written with this schema into v; other writers' records are refused.
func (s Schema) Decode(value []byte, v any) error {
	if len(value) < len(s.Header) || string(value[:len(s.Header)]) != string(s.Header) {
		return fmt.Errorf("not a record of this schema version (header %x)", value[:min(len(value), 10)])
	}
	return avro.Unmarshal(s.Avro, value[len(s.Header):], v)
}
