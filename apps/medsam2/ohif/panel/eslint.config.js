// The panel's linter (flat config, eslint 9 pinned in package-lock.json); `npm run lint`, run by scripts/test.sh.
import js from '@eslint/js';
import react from 'eslint-plugin-react';
import globals from 'globals';

export default [
  js.configs.recommended,
  react.configs.flat.recommended,
  { settings: { react: { version: '18.3' } } },
  {
    files: ['src/**/*.{js,jsx}'],
    languageOptions: { ecmaVersion: 2022, sourceType: 'module', globals: globals.browser },
    rules: {
      'react/prop-types': 'off', // plain JavaScript without a type layer; props are documented where declared
      'no-unused-vars': ['error', { args: 'after-used', caughtErrors: 'none' }],
      'max-lines-per-function': ['error', { max: 40, skipBlankLines: true, skipComments: true }],
      complexity: ['error', 15],
      'no-var': 'error',
      'prefer-const': 'error',
      eqeqeq: ['error', 'always'],
    },
  },
];
